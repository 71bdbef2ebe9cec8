"""`lorakit generate`: weighted stacks equal the merged model; the base comes from the adapter file."""

import copy

import torch

import lorakit
from lorakit.cli import main
from lorakit.llm import pretrained
from lorakit.llm.generate import complete, load_model, parse_adapter


def make_adapters(tmp_path, save_tiny):
    folder = str(save_tiny(tmp_path / "m"))
    base, _, _ = pretrained.load(folder)
    for name, r in (("a", 2), ("b", 4)):
        m = copy.deepcopy(base)
        lorakit.inject(m, lorakit.LoraConfig(r=r, alpha=8, targets="all-linear", init=False), name=name)
        lorakit.save(m, tmp_path / f"{name}.safetensors", base_model=folder)
    return folder


def test_adapter_specs_carry_weights():
    assert parse_adapter("x.safetensors") == ("x.safetensors", 1.0)
    assert parse_adapter("C:/x.safetensors:-0.5") == ("C:/x.safetensors", -0.5)


def test_two_weighted_adapters_generate_what_the_merged_model_generates(tmp_path, save_tiny):
    make_adapters(tmp_path, save_tiny)
    specs = [str(tmp_path / "a.safetensors:0.7"), str(tmp_path / "b.safetensors:-0.5")]
    stacked, tok = load_model(None, specs)
    merged, _ = load_model(None, specs, merge=True)
    assert lorakit.active(stacked) == {"a": 0.7, "b": -0.5}
    ids = tok(["a b c a", "c c b"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, stacked(**ids).logits, atol=1e-5, rtol=1e-5)
        base, _, _ = pretrained.load(str(tmp_path / "m"))
        assert not torch.allclose(base(**ids).logits, stacked(**ids).logits, atol=1e-3)
    prompts = ["a b", "c a b c"]
    assert complete(stacked, tok, prompts, max_new_tokens=6) == complete(merged, tok, prompts, max_new_tokens=6)


def test_cli_generates_from_the_adapters_recorded_base(tmp_path, save_tiny, capsys):
    make_adapters(tmp_path, save_tiny)
    assert main(["generate", "--adapter", str(tmp_path / "a.safetensors"), "--prompt", "a b", "--max-new-tokens", "4"]) == 0
    model, tok = load_model(str(tmp_path / "m"), [str(tmp_path / "a.safetensors")])
    assert capsys.readouterr().out == f">>> a b\n{complete(model, tok, ['a b'], max_new_tokens=4)[0]}\n\n"
