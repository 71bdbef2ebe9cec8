"""Adapter files: lorakit's own .safetensors file, pickles, loralib state dicts, `lorakit inspect`, and
every way a save, load or inject is refused (the model is then left exactly as it was)."""

import json
import os
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import loralib
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lorakit
import lorakit.formats.io
from lorakit import LoraConfig, LoraError
from lorakit.core.model import adapter_infos


# --- models and helpers ---------------------------------------------------------------------------
class Tiny(nn.Module):
    """One of each layer kind lorakit adapts: Embedding -> Conv2d -> two Linear projections -> head."""

    def __init__(self, dim=8):
        super().__init__()
        self.emb = nn.Embedding(20, dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, ids):
        h = self.conv(self.emb(ids).movedim(-1, 1)).movedim(1, -1)
        return self.head(torch.relu(self.q_proj(h)) * self.v_proj(h))


class EmbedNet(nn.Module):
    """Embedding -> projection -> head, built from loralib layers or from their plain equivalents."""

    def __init__(self, emb, proj):
        super().__init__()
        self.emb, self.q_proj, self.head = emb, proj, nn.Linear(6, 5)

    def forward(self, ids):
        return self.head(torch.relu(self.q_proj(self.emb(ids))))


TARGETS = ["emb", "conv", "q_proj", "v_proj"]
IDS = torch.randint(0, 20, (2, 4, 4), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny(dim=8):
    torch.manual_seed(0)
    return Tiny(dim).eval()


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()


def trained(model, name="default", **config):
    """`model` with a new adapter whose every trainable tensor (factors, copies, biases) is non-trivial."""
    lorakit.inject(model, LoraConfig(**{"r": 4, "alpha": 8, "targets": TARGETS, "init": False, **config}), name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def run(model):
    with torch.no_grad():
        if not hasattr(model, "config"):
            return model(IDS)
        out = model(TOKENS)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def header(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def rewrite(src, dst, tensors=lambda t: t, meta=lambda m: m):
    """Copy a safetensors file, editing its tensors and header on the way (as a damaged file would be)."""
    save_file(tensors(load_file(src)), dst, metadata=meta(header(src)))
    return dst


def snapshot(model):
    """Everything a refused operation must leave alone."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
        "adapters": lorakit.adapters(model),
        "active": lorakit.active(model),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for key in ("classes", "trainable", "adapters", "active"):
        assert after[key] == before[key], key


def loralib_pair(merge_weights=True, fan_in_fan_out=False):
    """A loralib model (r=4, alpha=8) with trained-looking factors, and a plain model with its base weights."""
    torch.manual_seed(0)
    lm = EmbedNet(loralib.Embedding(20, 8, r=4, lora_alpha=8, merge_weights=merge_weights),
                  loralib.Linear(8, 6, r=4, lora_alpha=8, fan_in_fan_out=fan_in_fan_out, merge_weights=merge_weights))
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_" in n:
                p.normal_()
    plain = EmbedNet(nn.Embedding(20, 8), Conv1D(6, 8) if fan_in_fan_out else nn.Linear(8, 6))
    plain.load_state_dict({k: v for k, v in lm.state_dict().items() if "lora_" not in k})  # lm is unmerged (train mode)
    return lm, plain.eval()


def loralib_output(lm):
    lm.eval()
    with torch.no_grad():
        return lm(IDS)


def loralib_file(path, lm, bias="none"):
    """loralib.lora_state_dict(lm), saved as safetensors."""
    save_file({k: v.contiguous() for k, v in loralib.lora_state_dict(lm, bias).items()}, path)


# --- lorakit's own file ---------------------------------------------------------------------------
ROUND_TRIPS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "rank_and_alpha_patterns": {"rank_pattern": {"conv": 2, "q_proj": 6}, "alpha_pattern": {"v_proj": 3.0}},
    "modules_to_save": {"modules_to_save": ["head"]},
    "bias_lora_only": {"bias": "lora_only"},
    "bias_all": {"bias": "all", "modules_to_save": ["head"]},
}


@pytest.mark.parametrize("config", ROUND_TRIPS.values(), ids=ROUND_TRIPS)
def test_round_trip_gives_identical_outputs(tmp_path, config):
    model = trained(tiny(), **config)
    path = lorakit.save(model, tmp_path / "x.safetensors")
    fresh = tiny()
    assert not torch.allclose(run(fresh), run(model))  # the adapter is not the identity
    assert lorakit.load(fresh, path) == "x"
    assert torch.equal(run(fresh), run(model))
    assert lorakit.active(fresh) == {"x": 1.0}
    assert adapter_infos(fresh)["x"]["config"] == adapter_infos(model)["default"]["config"]


def test_per_module_rank_alpha_and_scale_survive(tmp_path):
    model = trained(tiny(), use_rslora=True, rank_pattern={"conv": 2, "q_proj": 6}, alpha_pattern={"v_proj": 3.0})
    fresh = tiny()
    name = lorakit.load(fresh, lorakit.save(model, tmp_path / "x.safetensors"))
    loaded = {n: (getattr(fresh, n).lora_A[name].shape[0], getattr(fresh, n).lora_alpha[name],
                  getattr(fresh, n).lora_scale[name]) for n in TARGETS}
    assert loaded == {"emb": (4, 8, 4.0), "conv": (2, 8, 8 / 2 ** 0.5), "q_proj": (6, 8, 8 / 6 ** 0.5),
                      "v_proj": (4, 3.0, 1.5)}


def test_header_describes_the_adapter(tmp_path):
    model = trained(tiny(), rank_pattern={"q_proj": 6}, alpha_pattern={"v_proj": 3.0})
    meta = header(lorakit.save(model, tmp_path / "x.safetensors", base_model="org/tiny"))
    assert (meta["format"], meta["format_version"], meta["base_model"]) == ("lorakit", "1", "org/tiny")
    assert json.loads(meta["modules"]) == {
        "emb": {"kind": "embedding", "r": 4, "alpha": 8}, "conv": {"kind": "conv", "r": 4, "alpha": 8},
        "q_proj": {"kind": "linear", "r": 6, "alpha": 8}, "v_proj": {"kind": "linear", "r": 4, "alpha": 3.0}}
    assert json.loads(meta["targets"]) == TARGETS
    assert json.loads(meta["fingerprint"]) == {n: list(getattr(tiny(), n).weight.shape) for n in TARGETS}
    assert json.loads(meta["fingerprint"])["conv"] == [8, 8, 3, 3]


@pytest.mark.parametrize("where", ["config._name_or_path", "name_or_path"])
def test_base_model_defaults_to_the_models_own_id(tmp_path, where):
    model = trained(llama(), targets=["q_proj", "v_proj"])
    if where == "name_or_path":
        model.name_or_path = "org/tiny-llama"
    else:
        model.config._name_or_path = "org/tiny-llama"
    path = lorakit.save(model, tmp_path / "x.safetensors")
    assert header(path)["base_model"] == "org/tiny-llama"
    assert header(lorakit.save(model, tmp_path / "y.safetensors", base_model="org/other"))["base_model"] == "org/other"
    fresh = llama()  # no id of its own: the recorded one travels with the adapter
    lorakit.load(fresh, path)
    assert header(lorakit.save(fresh, tmp_path / "z.safetensors"))["base_model"] == "org/tiny-llama"


def test_unknown_base_model_is_recorded_as_unknown(tmp_path):
    path = lorakit.save(trained(tiny()), tmp_path / "x.safetensors")
    assert header(path)["base_model"] == ""
    assert lorakit.read(path)[0].base_model is None


@pytest.mark.parametrize("mode", ["lora_only", "all"])
@pytest.mark.parametrize("name", ["default", "bias"])
def test_bias_modes_save_exactly_the_module_biases(tmp_path, mode, name):
    """Also for an adapter named like a parameter, whose factors are called `<module>.lora_A.bias`."""
    model = trained(tiny(), name, bias=mode)
    path = lorakit.save(model, tmp_path / "x.safetensors")
    owners = {n for n, m in tiny().named_modules() if getattr(m, "bias", None) is not None
              and (mode == "all" or n in TARGETS)}
    assert {k for k in load_file(path) if k.startswith("bias.")} == {f"bias.{n}" for n in owners}
    fresh = tiny()
    lorakit.load(fresh, path)
    assert torch.equal(run(fresh), run(model))


@pytest.mark.parametrize("src,dst", [("causal_lm", "inner"), ("inner", "causal_lm")])
def test_adapter_moves_between_a_model_and_its_wrapper(tmp_path, src, dst):
    """Saved on LlamaForCausalLM, loads onto its LlamaModel, and back."""
    part = lambda m, which: m if which == "causal_lm" else m.model  # noqa: E731
    model = llama()
    trained(part(model, src), targets=["q_proj", "v_proj"])
    fresh = llama()
    lorakit.load(part(fresh, dst), lorakit.save(part(model, src), tmp_path / "x.safetensors"))
    assert torch.equal(run(fresh), run(model))


@pytest.mark.parametrize("filename,names", [
    ("style.safetensors", ["style", "style_2", "style_3"]),
    ("v1.2 style.safetensors", ["v1_2_style", "v1_2_style_2", "v1_2_style_3"]),
    ("2024.safetensors", ["a_2024", "a_2024_2", "a_2024_3"]),
])
def test_default_name_comes_from_the_file_and_never_clobbers(tmp_path, filename, names):
    path = lorakit.save(trained(tiny()), tmp_path / filename)
    fresh = tiny()
    assert [lorakit.load(fresh, path) for _ in names] == names
    assert lorakit.adapters(fresh) == names
    assert lorakit.active(fresh) == {names[-1]: 1.0}


def test_save_picks_the_only_active_adapter_or_asks(tmp_path):
    model = trained(trained(tiny(), "a"), "b")  # b active alone
    path = lorakit.save(model, tmp_path / "x.safetensors")
    assert torch.equal(load_file(path)["lora.q_proj.A"], model.q_proj.lora_A["b"])
    lorakit.set_weights(model, {"a": 1.0, "b": 0.5})
    with pytest.raises(LoraError, match=r"\['a', 'b'\].*name="):
        lorakit.save(model, tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()
    assert torch.equal(load_file(lorakit.save(model, tmp_path / "y.safetensors", name="a"))["lora.q_proj.A"],
                       model.q_proj.lora_A["a"])


def test_file_holds_only_the_adapter(tmp_path):
    model = trained(llama(), targets=["q_proj", "v_proj"])
    path = lorakit.save(model, tmp_path / "x.safetensors")
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n_lora == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)  # q_proj and v_proj (2 kv heads) x 2 layers
    assert path.stat().st_size == 8 + header_len + 4 * n_lora
    assert header_len < 4096
    assert path.stat().st_size < 4 * sum(p.numel() for p in llama().parameters()) / 10


# --- atomic writes --------------------------------------------------------------------------------
def test_save_over_a_file_replaces_it_and_leaves_nothing_else(tmp_path):
    path = lorakit.save(trained(tiny()), tmp_path / "x.safetensors")
    model = trained(tiny(), r=2)
    lorakit.save(model, path)
    assert torch.equal(load_file(path)["lora.q_proj.A"], model.q_proj.lora_A["default"])
    assert os.listdir(tmp_path) == ["x.safetensors"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "interrupt"])
def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, error):
    path = lorakit.save(trained(tiny()), tmp_path / "x.safetensors")
    old = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(old[: len(old) // 2])
        raise error

    monkeypatch.setattr(lorakit.formats.io, "save_file", half_write)
    with pytest.raises(type(error)):
        lorakit.save(trained(tiny(), r=2), path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["x.safetensors"]


@pytest.mark.parametrize("filename,kwargs,fragment", [
    ("x.bin", {}, "x.safetensors"),
    ("x.safetensors", {"format": "peft"}, "folder"),
    ("x.safetensors", {"format": "onnx"}, "'onnx'"),
    ("x.safetensors", {"name": "nope"}, "'nope'"),
], ids=["pickle_suffix", "peft_into_a_file", "unknown_format", "unknown_adapter"])
def test_refused_save_writes_nothing(tmp_path, filename, kwargs, fragment):
    with pytest.raises(LoraError, match=re.escape(fragment)):
        lorakit.save(trained(tiny()), tmp_path / filename, **kwargs)
    assert os.listdir(tmp_path) == []


# --- failed loads ---------------------------------------------------------------------------------
# Each case: (tmp_path, a good adapter file, the target model) -> (path to load, load kwargs, message
# fragments). The good file has LoRA on TARGETS, modules_to_save=["head"] and bias="lora_only"; the
# target already holds an adapter "first" on q_proj.
def _edit(*fragments, tensors=lambda t: t, fields=None):
    """A copy of the good file with its tensors and header fields edited."""
    def case(tmp, good, target):
        meta = lambda m: {**m, **{k: f(m[k]) for k, f in (fields or {}).items()}}  # noqa: E731
        path = rewrite(good, tmp / "edited.safetensors", tensors=tensors, meta=meta)
        return path, {}, [str(path), *fragments]
    return case


def _without(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _nan_at(key):
    def poison(t):
        t[key].view(-1)[0] = float("nan")
        return t
    return poison


def _bytes(transform):
    def case(tmp, good, target):
        path = tmp / "broken.safetensors"
        path.write_bytes(transform(good.read_bytes()))
        return path, {}, [str(path), "truncated or corrupt"]
    return case


def _other_base(tmp, good, target):
    path = lorakit.save(trained(tiny(dim=16)), tmp / "wide.safetensors")
    return path, {}, [str(path), "base", "'emb'", "[20, 16]", "[20, 8]"]


def _module_the_model_lacks(tmp, good, target):
    rename = lambda s: s.replace("q_proj", "k_proj")  # noqa: E731
    path = rewrite(good, tmp / "k.safetensors", tensors=lambda t: {rename(k): v for k, v in t.items()},
                   meta=lambda m: {k: rename(v) for k, v in m.items()})
    return path, {}, ["'k_proj'", "q_proj"]


def _unknown_format(tmp, good, target):
    path = tmp / "encoder.safetensors"
    save_file({"encoder.w": torch.randn(4, 4), "decoder.w": torch.randn(4, 4)}, path)
    return path, {}, [str(path), "not a LoRA file", "'encoder.w'"]


def _loralib(tensors, *fragments):
    def case(tmp, good, target):
        path = tmp / "loralib.safetensors"
        save_file(tensors, path)
        return path, {"alpha": 8}, [str(path), *fragments]
    return case


def _pickle(obj, kwargs, *fragments):
    def case(tmp, good, target):
        path = tmp / "adapter.bin"
        torch.save(obj, path)
        return path, kwargs, [str(path), *fragments]
    return case


def _peft_weights_without_config(tmp, good, target):
    folder = lorakit.save(trained(tiny()), tmp / "peft", format="peft")
    path = (folder / "adapter_model.safetensors").rename(tmp / "lonely.safetensors")
    return path, {}, [str(path), "adapter_config.json"]


def _peft_config_not_json(tmp, good, target):
    folder = lorakit.save(trained(tiny()), tmp / "peft", format="peft")
    (folder / "adapter_config.json").write_text("{'r': 4")
    return folder, {}, [str(folder / "adapter_config.json"), "JSON"]


def _missing_file(tmp, good, target):
    return tmp / "nope.safetensors", {}, [str(tmp / "nope.safetensors"), "no such file"]


def _folder_without_config(tmp, good, target):
    (tmp / "folder").mkdir()
    return tmp / "folder", {}, [str(tmp / "folder"), "adapter_config.json"]


def _name_taken(tmp, good, target):
    return good, {"name": "first"}, ["'first'"]


def _bad_name(tmp, good, target):
    return good, {"name": "my.adapter"}, ["'my.adapter'"]


def _merged(targets):
    def case(tmp, good, target):
        lorakit.merge(target)
        return lorakit.save(trained(tiny(), targets=targets), tmp / "other.safetensors"), {}, ["unmerge"]
    return case


FAILED_LOADS = {
    "missing_key": _edit("'lora.q_proj.B'", "'q_proj'", "missing", tensors=_without("lora.q_proj.B")),
    "stray_tensor": _edit("'lora.k_proj.A'", tensors=lambda t: {**t, "lora.k_proj.A": torch.zeros(4, 8)}),
    "saved_module_incomplete": _edit("'head'", tensors=_without("saved.head.bias")),
    "bias_of_other_shape": _edit("'q_proj'", "bias", tensors=lambda t: {**t, "bias.q_proj": torch.zeros(3)}),
    "nan_in_lora_factor": _edit("'q_proj'", "NaN", tensors=_nan_at("lora.q_proj.A")),
    "nan_in_saved_module": _edit("'head'", "NaN", tensors=_nan_at("saved.head.weight")),
    "nan_in_bias": _edit("'q_proj'", "NaN", tensors=_nan_at("bias.q_proj")),
    "no_lora_tensors": _edit("no LoRA tensors", tensors=lambda t: {},
                             fields={"modules": lambda v: "{}", "saved": lambda v: "[]",
                                     "fingerprint": lambda v: "{}"}),
    "other_base_shapes": _other_base,
    "other_base_fingerprint": _edit("'conv'", "base", "[8, 8, 5, 5]",
                                    fields={"fingerprint": lambda v: v.replace("[8, 8, 3, 3]", "[8, 8, 5, 5]")}),
    "other_layer_kind": _edit("'q_proj'", "embedding",
                              fields={"modules": lambda v: v.replace('"kind": "linear"', '"kind": "embedding"', 1)}),
    "module_the_model_lacks": _module_the_model_lacks,
    "future_format_version": _edit("version '2'", "Upgrade", fields={"format_version": lambda v: "2"}),
    "damaged_header": _edit("damaged", fields={"modules": lambda v: v[:-3]}),
    "header_rank_disagrees": _edit("'emb'", "rank 3", fields={"modules": lambda v: v.replace('"r": 4', '"r": 3', 1)}),
    "truncated": _bytes(lambda b: b[: len(b) // 2]),
    "truncated_header": _bytes(lambda b: b[:20]),
    "empty": _bytes(lambda b: b""),
    "garbage": _bytes(lambda b: bytes(range(256)) * 4),
    "unknown_format": _unknown_format,
    "loralib_half_pair": _loralib({"q_proj.lora_A": torch.randn(2, 8)}, "'q_proj'", "pairs"),
    "loralib_wrong_shape": _loralib({"q_proj.lora_A": torch.randn(2, 5), "q_proj.lora_B": torch.randn(8, 2)},
                                    "'q_proj'", "[2, 5]", "[2, 8]"),
    "pickle_not_allowed": _pickle({"q_proj.lora_A": torch.randn(2, 8), "q_proj.lora_B": torch.randn(8, 2)}, {},
                                  "allow_pickle"),
    "pickle_not_a_state_dict": _pickle([1, 2, 3], {"allow_pickle": True}, "dict of tensors"),
    "peft_weights_without_config": _peft_weights_without_config,
    "peft_config_not_json": _peft_config_not_json,
    "missing_file": _missing_file,
    "folder_without_config": _folder_without_config,
    "name_taken": _name_taken,
    "invalid_name": _bad_name,
    "merged_same_module": _merged(["q_proj"]),
    "merged_other_module": _merged(["v_proj"]),
}


@pytest.mark.parametrize("case", FAILED_LOADS.values(), ids=FAILED_LOADS)
def test_failed_load_names_the_problem_and_leaves_the_model_as_it_was(tmp_path, case):
    target = trained(tiny(), "first", r=2, targets=["q_proj"])
    good = lorakit.save(trained(tiny(), modules_to_save=["head"], bias="lora_only"), tmp_path / "good.safetensors")
    path, kwargs, fragments = case(tmp_path, good, target)
    before = snapshot(target)
    with pytest.raises(LoraError) as e:
        lorakit.load(target, path, **kwargs)
    for fragment in fragments:
        assert fragment in str(e.value)
    assert_unchanged(target, before)


# --- pickles --------------------------------------------------------------------------------------
def _loralib_pickle(path, lm):
    torch.save(loralib.lora_state_dict(lm), path)


def _peft_folder_with_bin(path, lm):
    """The same adapter as a PEFT folder holding adapter_model.bin (PEFT's pickle layout)."""
    loralib_file(path.with_suffix(".safetensors"), lm)
    _, plain = loralib_pair()
    lorakit.load(plain, path.with_suffix(".safetensors"), alpha=8)
    folder = lorakit.save(plain, path, format="peft")
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()


@pytest.mark.parametrize("filename,write", [("lora.pt", _loralib_pickle), ("lora.bin", _loralib_pickle),
                                            ("peft_folder", _peft_folder_with_bin)], ids=["pt", "bin", "peft_bin"])
def test_pickle_loads_only_with_allow_pickle(tmp_path, filename, write):
    lm, plain = loralib_pair()
    path = tmp_path / filename
    write(path, lm)
    before = snapshot(plain)
    with pytest.raises(LoraError, match="allow_pickle=True"):
        lorakit.load(plain, path, alpha=8)
    assert_unchanged(plain, before)
    lorakit.load(plain, path, allow_pickle=True, alpha=8)
    torch.testing.assert_close(run(plain), loralib_output(lm))


CALLS = []


def _record(what):
    CALLS.append(what)
    return {}


class Payload:
    """A pickle that runs code when loaded."""

    def __reduce__(self):
        return _record, ("code ran",)


def test_pickle_that_runs_code_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"q_proj.lora_A": Payload()}, path)
    model = tiny()
    before = snapshot(model)
    with pytest.raises(LoraError, match="weights-only"):
        lorakit.load(model, path, allow_pickle=True, alpha=8)
    assert CALLS == []
    assert_unchanged(model, before)


# --- loralib --------------------------------------------------------------------------------------
@pytest.mark.parametrize("merge_weights", [True, False], ids=["merges_on_eval", "never_merges"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "fan_in_fan_out_to_conv1d"])
def test_loralib_state_dict_gives_the_loralib_models_outputs(tmp_path, merge_weights, fan_in_fan_out):
    lm, plain = loralib_pair(merge_weights, fan_in_fan_out)
    base = run(plain)
    loralib_file(tmp_path / "lora.safetensors", lm)
    lorakit.load(plain, tmp_path / "lora.safetensors", alpha=8)
    want = loralib_output(lm)
    assert not torch.allclose(base, want)
    torch.testing.assert_close(run(plain), want)


@pytest.mark.parametrize("bias,keys", [("lora_only", ["q_proj.bias"]), ("all", ["q_proj.bias", "head.bias"])])
def test_loralib_trained_biases_travel_with_the_adapter(tmp_path, bias, keys):
    lm, plain = loralib_pair()
    assert [k for k in loralib.lora_state_dict(lm, bias) if k.endswith(".bias")] == keys
    with torch.no_grad():
        for k in keys:
            lm.get_parameter(k).add_(1.0)
    loralib_file(tmp_path / "l.safetensors", lm, bias)
    lorakit.load(plain, tmp_path / "l.safetensors", alpha=8)
    torch.testing.assert_close(run(plain), loralib_output(lm))


def test_loralib_without_alpha_warns_and_uses_loralibs_default(tmp_path):
    lm, plain = loralib_pair()
    path = tmp_path / "lora.safetensors"
    loralib_file(path, lm)
    with pytest.warns(UserWarning, match="alpha") as record:
        name = lorakit.load(plain, path)
    assert str(path) in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller's line, not at lorakit's internals
    assert plain.q_proj.lora_scale[name] == 1 / 4  # loralib's default alpha=1
    _, other = loralib_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        name = lorakit.load(other, path, alpha=8)
    assert other.q_proj.lora_scale[name] == 8 / 4


@pytest.mark.parametrize("layer", ["conv2d", "merged_linear"])
def test_loralib_layers_with_another_layout_are_refused(tmp_path, layer):
    """loralib's Conv2d (A: r*k x in*k) and MergedLinear (fused qkv) have no lorakit equivalent."""
    torch.manual_seed(0)
    if layer == "conv2d":
        lm, plain = nn.Sequential(loralib.Conv2d(4, 6, 3, r=2, lora_alpha=2)), nn.Sequential(nn.Conv2d(4, 6, 3))
    else:
        lm = nn.Sequential(loralib.MergedLinear(32, 96, r=4, lora_alpha=8, enable_lora=[True, False, True]))
        plain = nn.Sequential(nn.Linear(32, 96))
    loralib_file(tmp_path / "lora.safetensors", lm)
    before = snapshot(plain)
    with pytest.raises(LoraError, match=r"module '0' factor [AB] has shape"):
        lorakit.load(plain, tmp_path / "lora.safetensors", alpha=8)
    assert_unchanged(plain, before)


# --- targeting --------------------------------------------------------------------------------------
def refusal(label, fragments, name="second", prepare=None, **config):
    return pytest.param(config, name, prepare, fragments, id=label)


INJECT_REFUSALS = [
    refusal("misspelt_target", ["'q_prj'", "q_proj"], targets=["q_prj"]),
    refusal("regex_matching_nothing", ["matches no module", "qkv_proj"], targets=r".*\.qkv_proj"),
    refusal("exclude_matching_nothing", ["exclude", "'o_prj'", "o_proj"], targets=["q_proj"], exclude=["o_prj"]),
    refusal("exclude_removing_everything", ["removes every module"], targets=["q_proj"], exclude=["q_proj"]),
    refusal("unmatched_rank_pattern", ["rank_pattern", "'k_proj'"], targets=["q_proj", "v_proj"],
            rank_pattern={"k_proj": 2}),
    refusal("unmatched_alpha_pattern", ["alpha_pattern", "'o_proj'"], targets=["q_proj", "v_proj"],
            alpha_pattern={"o_proj": 2}),
    refusal("non_adaptable_module", ["'model.layers.0.self_attn'", "LlamaAttention", "'q_proj'", "'v_proj'"],
            targets=["self_attn"]),
    refusal("modules_to_save_overlapping_target", ["modules_to_save", "self_attn", "q_proj"], targets=["q_proj"],
            modules_to_save=["self_attn"]),
    refusal("modules_to_save_matching_nothing", ["'lm_hed'", "lm_head"], targets=["q_proj"],
            modules_to_save=["lm_hed"]),
    refusal("invalid_name", ["'my.adapter'"], name="my.adapter", targets=["v_proj"]),
    refusal("empty_name", ["''"], name="", targets=["v_proj"]),
    refusal("name_taken", ["'first'"], name="first", targets=["v_proj"]),
    refusal("merged_same_module", ["unmerge"], prepare=lorakit.merge, targets=["q_proj"]),
    refusal("merged_other_module", ["unmerge"], prepare=lorakit.merge, targets=["v_proj"]),
]


@pytest.mark.parametrize("config,name,prepare,fragments", INJECT_REFUSALS)
def test_refused_inject_names_the_problem_and_changes_nothing(config, name, prepare, fragments):
    model = trained(llama(), "first", r=2, targets=["q_proj"])
    if prepare:
        prepare(model)
    before = snapshot(model)
    with pytest.raises(LoraError) as e:
        lorakit.inject(model, LoraConfig(**config), name)
    for fragment in fragments:
        assert fragment in str(e.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"r": 0}, "r must"), ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']"), ({"dropout": 1.0}, "dropout"),
    ({"bias": "some"}, "bias"), ({"init": "xavier"}, "init"), ({"targets": []}, "empty"),
    ({"targets": "q_proj("}, "regular expression"),
], ids=["rank", "rank_pattern", "dropout", "bias", "init", "no_targets", "bad_regex"])
def test_bad_config_is_refused(kwargs, fragment):
    with pytest.raises(LoraError, match=re.escape(fragment)):
        LoraConfig(**kwargs)


# --- lorakit inspect ------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["lorakit", "peft"])
def test_inspect_describes_an_adapter(tmp_path, capsys, format):
    from lorakit.cli import main

    model = trained(llama(), targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    model.config._name_or_path = "org/tiny-llama"
    path = lorakit.save(model, tmp_path / ("x.safetensors" if format == "lorakit" else "x"), format=format)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"format:\s+{format}\b", out) and "org/tiny-llama" in out
    assert re.search(r"ranks:\s+\[2, 4\]", out)
    assert f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}" in out
    kind = "linear" if format == "lorakit" else r"\S+"  # PEFT files do not record the layer kind
    for n, m in model.named_modules():
        if isinstance(m, lorakit.LoraLayer):
            assert re.search(rf"{re.escape(n)}\s+{kind}\s+{m.lora_A['default'].shape[0]}\s", out)


def test_inspect_reports_a_bad_file_and_exits_2(tmp_path, capsys):
    from lorakit.cli import main

    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error:") and str(path) in err


def test_inspect_runs_as_a_command(tmp_path):
    path = lorakit.save(trained(tiny()), tmp_path / "x.safetensors")
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(n in done.stdout for n in TARGETS)
