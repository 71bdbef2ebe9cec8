"""Reliability of the adapter formats (issue 11): whole-folder PEFT writes under SIGKILL, loralib checkpoints with
fully trained tensors, damaged lorakit headers, learned token embeddings that never clobber the vocabulary."""

import json
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraError
from lorakit.formats.adapter import Adapter, ModuleLora


def _adapter(r, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    return Adapter({"q": ModuleLora(torch.randn(r, 8, generator=g), torch.randn(8, r, generator=g), float(alpha))})


# --- 1. a PEFT folder is replaced as a whole ----------------------------------------------------------
CHILD = textwrap.dedent("""
    import pathlib, sys, time
    import lorakit.formats.io as io
    sys.path.insert(0, sys.argv[2])
    from test_reliability_formats import _adapter

    real_save, real_text = io.save_file, pathlib.Path.write_text

    def slow_save(*a, **k):  # each file takes a while, so random kill times land between the two files
        real_save(*a, **k)
        time.sleep(0.02)

    def slow_text(self, *a, **k):
        n = real_text(self, *a, **k)
        time.sleep(0.02)
        return n

    io.save_file, pathlib.Path.write_text = slow_save, slow_text
    adapters = [_adapter(4, 16, 1), _adapter(2, 4, 0)]
    print("ready", flush=True)
    for i in range(10**6):
        io.write(adapters[i % 2], sys.argv[1], "peft")
""")


def _which(folder, candidates):
    """The index of the candidate adapter the folder holds; fails on a mix of two."""
    got = lorakit.read(folder)[0].modules["q"]
    for i, want in enumerate(candidates):
        w = want.modules["q"]
        if got.alpha == w.alpha and torch.equal(got.A, w.A) and torch.equal(got.B, w.B):
            return i
    raise AssertionError(f"the folder holds a mix: r={got.r}, alpha={got.alpha}")


def test_peft_folder_survives_sigkill_as_old_or_new(tmp_path):
    folder, old, new = tmp_path / "peft", _adapter(2, 4, 0), _adapter(4, 16, 1)
    lorakit.formats.io.write(old, folder, "peft")
    (folder / "README.md").write_text("mine")
    rng, seen = random.Random(0), set()
    tests = str(__import__("pathlib").Path(__file__).parent)
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), tests], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        __import__("time").sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        seen.add(_which(folder, [old, new]))
        assert (folder / "README.md").read_text() == "mine"  # other files of the folder are kept
    assert seen == {0, 1}  # the kills landed at different points of the writes


def test_peft_folder_replaced_where_no_atomic_swap_exists(tmp_path, monkeypatch):
    """Without renameat2 (not Linux) the old folder is moved aside, then the new one renamed in."""
    folder = tmp_path / "peft"
    lorakit.formats.io.write(_adapter(2, 4, 0), folder, "peft")
    (folder / "README.md").write_text("mine")
    monkeypatch.setattr(lorakit.formats.io, "_exchange", lambda a, b: False)
    lorakit.formats.io.write(_adapter(4, 16, 1), folder, "peft")
    assert _which(folder, [_adapter(2, 4, 0), _adapter(4, 16, 1)]) == 1
    assert (folder / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no temp folder left


def test_peft_folder_behind_a_symlink_is_replaced_where_it_points(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    lorakit.formats.io.write(_adapter(2, 4, 0), tmp_path / "link", "peft")
    lorakit.formats.io.write(_adapter(4, 16, 1), tmp_path / "link", "peft")
    assert (tmp_path / "link").is_symlink() and _which(tmp_path / "real", [_adapter(4, 16, 1)]) == 0


def test_peft_write_over_a_file_is_refused(tmp_path):
    (tmp_path / "x").write_text("keep")
    with pytest.raises(LoraError, match="is a file"):
        lorakit.formats.io.write(_adapter(2, 4, 0), tmp_path / "x", "peft")
    assert (tmp_path / "x").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# --- 3. a damaged lorakit header --------------------------------------------------------------------
@pytest.mark.parametrize("info", [{"alpha": 4.0}, {"r": 2}, {"r": "2", "alpha": 4.0}, [2, 4]],
                         ids=["no_r", "no_alpha", "r_not_int", "not_a_dict"])
def test_damaged_lorakit_header_raises_lora_error(tmp_path, info):
    path = tmp_path / "a.safetensors"
    lorakit.formats.io.write(_adapter(2, 4, 0), path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    meta["modules"] = json.dumps({"q": info})
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(LoraError, match="header is damaged"):
        lorakit.read(path)


# --- 2. loralib checkpoints with fully trained tensors ---------------------------------------------
def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=20, num_labels=3)
    return RobertaForSequenceClassification(cfg).eval()


IDS = torch.tensor([[0, 5, 9, 17, 2]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _loralib_checkpoint(path):
    """microsoft/LoRA's GLUE recipe: loralib query/value (r=4, alpha=8) on RoBERTa, the classifier trained in full;
    torch.save(lora_state_dict + classifier). Returns the loralib model's logits."""
    import loralib

    model = _roberta()
    torch.manual_seed(1)
    for layer in model.roberta.encoder.layer:
        for name in ("query", "value"):
            old = getattr(layer.attention.self, name)
            new = loralib.Linear(16, 16, r=4, lora_alpha=8, merge_weights=False)
            new.load_state_dict({**old.state_dict(), "lora_A": torch.randn(4, 16), "lora_B": torch.randn(16, 4)})
            setattr(layer.attention.self, name, new)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.add_(torch.randn_like(p))
    sd = {**loralib.lora_state_dict(model), **{f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}}
    assert sorted(sd)[:2] == ["classifier.dense.bias", "classifier.dense.weight"]
    torch.save(sd, path)
    return _logits(model.eval())


def test_loralib_checkpoint_with_a_trained_classifier(tmp_path):
    want = _loralib_checkpoint(tmp_path / "glue.pt")
    model = _roberta()
    base = _logits(model)
    name = lorakit.load(model, tmp_path / "glue.pt", allow_pickle=True, alpha=8)
    torch.testing.assert_close(_logits(model), want)
    with lorakit.disabled(model):
        torch.testing.assert_close(_logits(model), base)
    lorakit.save(model, tmp_path / "again.safetensors", name)  # the classifier is saved again
    other = _roberta()
    lorakit.load(other, tmp_path / "again.safetensors")
    torch.testing.assert_close(_logits(other), want)
    lorakit.unload(model, merge=False)
    torch.testing.assert_close(_logits(model), base)
    assert type(model.classifier.dense).__name__ == "Linear"
    lorakit.delete(other, "again")
    torch.testing.assert_close(_logits(other), base)


def test_loralib_full_state_dict_keeps_base_weights_as_a_fingerprint(tmp_path):
    """A whole state dict (frozen base weights included) loads; the base weights only check the shapes."""
    import loralib

    torch.manual_seed(0)
    lm = torch.nn.Sequential(loralib.Linear(8, 6, r=2, lora_alpha=4, merge_weights=False))
    torch.save(lm.state_dict(), tmp_path / "full.pt")
    a, fmt = lorakit.read(tmp_path / "full.pt", allow_pickle=True, alpha=4)
    assert fmt == "loralib" and a.fingerprint == {"0": [6, 8]} and not a.saved
    with pytest.raises(LoraError, match="weight shape"):
        lorakit.load(torch.nn.Sequential(torch.nn.Linear(8, 5)), tmp_path / "full.pt", allow_pickle=True, alpha=4)


# --- 4. learned token embeddings never replace a known token, and go with their adapter -------------
def _pivotal_file(path, tokens, seed=0):
    """A lorakit file with LoRA on the text encoder's first q_proj and learned embeddings for `tokens`."""
    g = torch.Generator().manual_seed(seed)
    a = Adapter({"text_encoder.encoder.layers.0.self_attn.q_proj": ModuleLora(
        torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 2.0, "linear")},
        embeddings={t: torch.randn(16, generator=g) for t in tokens})
    lorakit.formats.io.write(a, path)
    return a


def _text_state(pipe):
    return {"vocab": dict(pipe.tokenizer.get_vocab()), "len": len(pipe.tokenizer),
            "rows": {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}}


def _assert_same_text_state(pipe, before):
    after = _text_state(pipe)
    assert after["vocab"] == before["vocab"] and after["len"] == before["len"]
    assert after["rows"].keys() == before["rows"].keys()
    for k, v in before["rows"].items():
        assert torch.equal(after["rows"][k], v), k


def _encode(pipe, prompt):
    with torch.no_grad():
        return pipe.text_encoder(pipe.tokenizer(prompt, return_tensors="pt").input_ids).last_hidden_state


def test_learned_token_never_replaces_a_known_token(tiny_sd, tmp_path):
    _pivotal_file(tmp_path / "clash.safetensors", ["<s1>", "a</w>"])  # 'a</w>' is the word "a" of the vocabulary
    before = _text_state(tiny_sd)
    with pytest.raises(LoraError, match=r"'a</w>' is already in the tokenizer"):
        lorakit.load(tiny_sd, tmp_path / "clash.safetensors")
    _assert_same_text_state(tiny_sd, before)
    assert lorakit.adapters(tiny_sd) == []


@pytest.mark.parametrize("undo", ["delete", "unload"])
def test_delete_and_unload_remove_the_learned_tokens(tiny_sd, tmp_path, undo):
    a = _pivotal_file(tmp_path / "piv.safetensors", [f"<s{i}>" for i in range(12)])  # 55 + 12 > 64 rows: grows
    before, base = _text_state(tiny_sd), _encode(tiny_sd, "a b")
    name = lorakit.load(tiny_sd, tmp_path / "piv.safetensors")
    i = tiny_sd.tokenizer.convert_tokens_to_ids("<s3>")
    assert torch.equal(tiny_sd.text_encoder.get_input_embeddings().weight[i], a.embeddings["<s3>"])
    with lorakit.disabled(tiny_sd):  # no existing row changed: a prompt without the new tokens is the base's
        torch.testing.assert_close(_encode(tiny_sd, "a b"), base, rtol=0, atol=0)
    if undo == "delete":
        lorakit.delete(tiny_sd, name)
    else:
        lorakit.unload(tiny_sd, merge=False)
    _assert_same_text_state(tiny_sd, before)
    lorakit.load(tiny_sd, tmp_path / "piv.safetensors")  # and it loads again
    assert "<s3>" in tiny_sd.tokenizer.get_vocab()


def test_unload_with_merge_keeps_the_learned_tokens(tiny_sd, tmp_path):
    a = _pivotal_file(tmp_path / "piv.safetensors", ["<s1>"])
    lorakit.load(tiny_sd, tmp_path / "piv.safetensors")
    lorakit.unload(tiny_sd, merge=True)
    i = tiny_sd.tokenizer.convert_tokens_to_ids("<s1>")
    assert torch.equal(tiny_sd.text_encoder.get_input_embeddings().weight[i], a.embeddings["<s1>"])


def test_deleting_an_earlier_adapter_keeps_later_tokens_working(tiny_sd, tmp_path):
    before = _text_state(tiny_sd)
    _pivotal_file(tmp_path / "one.safetensors", ["<a1>", "<a2>"], seed=1)
    b = _pivotal_file(tmp_path / "two.safetensors", ["<b1>"], seed=2)
    one = lorakit.load(tiny_sd, tmp_path / "one.safetensors")
    two = lorakit.load(tiny_sd, tmp_path / "two.safetensors")
    lorakit.delete(tiny_sd, one)
    vocab = tiny_sd.tokenizer.get_vocab()
    assert "<a1>" not in vocab and len(tiny_sd.tokenizer) == before["len"] + 1
    assert torch.equal(tiny_sd.text_encoder.get_input_embeddings().weight[vocab["<b1>"]], b.embeddings["<b1>"])
    assert tiny_sd.tokenizer("<b1>").input_ids[1] == vocab["<b1>"]
    lorakit.delete(tiny_sd, two)
    assert tiny_sd.tokenizer.get_vocab() == before["vocab"]


def test_generate_image_keeps_the_tokens_of_a_lora_split_by_component(tiny_sd, tmp_path):
    """`<lora:NAME:TE:UNET>` with two weights reloads the file per component: its learned tokens must stay."""
    from lorakit.sd.generate import load_pipeline

    tiny_sd.save_pretrained(tmp_path / "pipe")
    g = torch.Generator().manual_seed(0)
    a = Adapter({"text_encoder.encoder.layers.0.self_attn.q_proj": ModuleLora(
        torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 2.0, "linear"),
        "unet.down_blocks.0.attentions.0.proj_in": ModuleLora(torch.randn(2, 8, generator=g),
                                                               torch.randn(8, 2, generator=g), 2.0)},
        embeddings={"<s1>": torch.randn(16, generator=g)})
    (tmp_path / "loras").mkdir()
    lorakit.formats.io.write(a, tmp_path / "loras" / "piv.safetensors")
    pipe, prompt = load_pipeline(str(tmp_path / "pipe"), [], "a <s1> <lora:piv:0.5:1>", str(tmp_path / "loras"))
    assert prompt == "a <s1>" and lorakit.active(pipe) == {"lora0_text_encoder": 0.5, "lora0_unet": 1.0}
    i = pipe.tokenizer.get_vocab()["<s1>"]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[i], a.embeddings["<s1>"])
