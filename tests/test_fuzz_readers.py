"""Property-based fuzzing of every adapter reader (issue 11): truncated files, flipped bytes, absurd safetensors
header sizes, integer/NaN/wrong-shape tensors, damaged PEFT configs and files mixing two formats. lorakit.read and
lorakit.load raise nothing but LoraError, and a failed load leaves the model exactly as it was."""

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError
from lorakit.formats.adapter import Adapter, ModuleLora
from lorakit.formats.io import write

EXAMPLES = {"bytes": 400, "header_size": 100, "tensors": 400, "peft_config": 200, "mixed": 200}
FUZZ_CASES = sum(EXAMPLES.values())  # cases run per test session (the README states this number)
SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.q(x) + self.v(x))


def _net():
    torch.manual_seed(0)
    return Net()


def _make_files(root: Path) -> dict[str, Path]:
    """One valid file (or PEFT folder) per format."""
    m = lorakit.inject(_net(), LoraConfig(r=2, alpha=4, targets=["q", "v"], modules_to_save=["head"]))
    files = {"lorakit": lorakit.save(m, root / "a.safetensors"), "peft": lorakit.save(m, root / "peft", format="peft")}
    g = torch.Generator().manual_seed(0)
    pipe = Adapter({"unet.down_blocks.0.attentions.0.proj_in": ModuleLora(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 4.0)})
    files["diffusers"] = write(pipe, root / "d.safetensors", "diffusers")
    files["kohya"] = write(pipe, root / "k.safetensors", "kohya")
    files["lycoris"] = root / "l.safetensors"
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": torch.randn(*s, generator=g) for k, s in
               {"hada_w1_a": (8, 2), "hada_w1_b": (2, 8), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)}.items()}
              | {"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}, files["lycoris"])
    files["cloneofsimo"] = root / "c.safetensors"
    save_file({"unet:0:up": torch.randn(8, 2, generator=g), "unet:0:down": torch.randn(2, 8, generator=g)},
              files["cloneofsimo"])
    loralib = {"q.lora_A": torch.randn(2, 8, generator=g), "q.lora_B": torch.randn(8, 2, generator=g),
               "head.weight": torch.randn(4, 8, generator=g), "head.bias": torch.randn(4, generator=g)}
    files["loralib"], files["loralib_pt"] = root / "ll.safetensors", root / "ll.pt"
    save_file(loralib, files["loralib"])
    torch.save(loralib, files["loralib_pt"])
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _make_files(tmp_path_factory.mktemp("valid"))


def _state(model):
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "classes": {n: type(m) for n, m in model.named_modules()}, "adapters": lorakit.adapters(model)}


def check(path):
    """read and load `path`: success, or LoraError with the model left exactly as it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            lorakit.read(path, allow_pickle=True, alpha=4)
        except LoraError:
            pass
        model = _net()
        before = _state(model)
        try:
            lorakit.load(model, path, allow_pickle=True, alpha=4)
        except LoraError:
            after = _state(model)
            assert after["classes"] == before["classes"] and after["adapters"] == before["adapters"] == []
            for k, v in before["state"].items():
                assert torch.equal(after["state"][k], v), k


def _copy(src: Path, dest: Path) -> Path:
    """A fresh copy of a valid file or folder at `dest` (a folder's weights file is returned for mutation)."""
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    if src.is_dir():
        shutil.copytree(src, dest)
        return dest
    dest = dest.with_suffix(src.suffix)
    shutil.copy(src, dest)
    return dest


def _target(path: Path) -> Path:
    return path / "adapter_model.safetensors" if path.is_dir() else path


FORMATS = ["lorakit", "peft", "diffusers", "kohya", "lycoris", "cloneofsimo", "loralib", "loralib_pt"]


@settings(max_examples=EXAMPLES["bytes"], **SETTINGS)
@given(fmt=st.sampled_from(FORMATS), cut=st.none() | st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4))
def test_truncated_and_flipped_files(files, tmp_path, fmt, cut, flips):
    path = _copy(files[fmt], tmp_path / "f")
    target = _target(path)
    data = bytearray(target.read_bytes())
    for where, byte in flips:
        data[int(where * len(data))] = byte
    if cut is not None:
        data = data[: int(cut * len(data))]
    target.write_bytes(bytes(data))
    check(path)


@settings(max_examples=EXAMPLES["header_size"], **SETTINGS)
@given(fmt=st.sampled_from([f for f in FORMATS if f != "loralib_pt"]), size=st.integers(0, 2**64 - 1))
def test_absurd_safetensors_header_sizes(files, tmp_path, fmt, size):
    path = _copy(files[fmt], tmp_path / "f")
    target = _target(path)
    data = target.read_bytes()
    target.write_bytes(struct.pack("<Q", size) + data[8:])
    check(path)


BAD = {
    "int": lambda t: torch.ones_like(t, dtype=torch.int64),
    "bool": lambda t: torch.ones_like(t, dtype=torch.bool),
    "nan": lambda t: torch.full_like(t, float("nan")),
    "inf": lambda t: torch.full_like(t, float("-inf")),
    "scalar": lambda t: torch.tensor(1.5),
    "empty": lambda t: torch.zeros(0),
    "transposed": lambda t: t.T.contiguous() if t.dim() == 2 else t.reshape(-1),
    "wider": lambda t: torch.randn(*[s + 1 for s in t.shape]) if t.dim() else torch.randn(2),
    "3d": lambda t: t.reshape(1, *t.shape),
    "half": lambda t: t.half(),
}


@settings(max_examples=EXAMPLES["tensors"], **SETTINGS)
@given(fmt=st.sampled_from(FORMATS), which=st.floats(0, 1, exclude_max=True), bad=st.sampled_from(sorted(BAD)),
       drop=st.booleans())
def test_bad_tensors(files, tmp_path, fmt, which, bad, drop):
    path = _copy(files[fmt], tmp_path / "f")
    target = _target(path)
    if target.suffix == ".pt":
        tensors, metadata = torch.load(target, weights_only=True), None
    else:
        from safetensors import safe_open

        with safe_open(str(target), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(target))
    key = sorted(tensors)[int(which * len(tensors))]
    if drop:
        del tensors[key]
    else:
        tensors[key] = BAD[bad](tensors[key])
    if target.suffix == ".pt":
        torch.save(tensors, target)
    else:
        save_file(tensors, str(target), metadata=metadata)
    check(path)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                    max_leaves=6)
PEFT_KEYS = ["peft_type", "r", "lora_alpha", "alpha_pattern", "rank_pattern", "target_modules", "modules_to_save",
             "bias", "use_rslora", "lora_dropout", "exclude_modules", "use_dora", "base_model_name_or_path"]


@settings(max_examples=EXAMPLES["peft_config"], **SETTINGS)
@given(changes=st.dictionaries(st.sampled_from(PEFT_KEYS), JSON, min_size=1, max_size=3), whole=st.none() | JSON)
def test_damaged_peft_config(files, tmp_path, changes, whole):
    path = _copy(files["peft"], tmp_path / "f")
    config = json.loads((path / "adapter_config.json").read_text())
    config = whole if whole is not None else {**config, **changes}
    (path / "adapter_config.json").write_text(json.dumps(config))
    check(path)


@settings(max_examples=EXAMPLES["mixed"], **SETTINGS)
@given(a=st.sampled_from(FORMATS), b=st.sampled_from(FORMATS), keep=st.lists(st.booleans(), min_size=12, max_size=12),
       header=st.booleans())
def test_files_mixing_two_formats(files, tmp_path, a, b, keep, header):
    def tensors(fmt):
        p = _target(files[fmt])
        return torch.load(p, weights_only=True) if p.suffix == ".pt" else load_file(str(p))

    mixed = {**tensors(a), **tensors(b)}
    mixed = {k: v for (k, v), on in zip(sorted(mixed.items()), keep * 4) if on}
    metadata = None
    if header and _target(files[a]).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(_target(files[a])), "pt") as f:
            metadata = f.metadata()
    save_file({k: v.contiguous() for k, v in mixed.items()}, str(tmp_path / "m.safetensors"), metadata=metadata)
    check(tmp_path / "m.safetensors")


def test_valid_files_load(files):
    """The fuzzed files start out valid (those made for a pipeline are refused on this plain model)."""
    for fmt in ("lorakit", "peft", "loralib", "loralib_pt"):
        model = _net()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lorakit.load(model, files[fmt], allow_pickle=True, alpha=4)
    for fmt in FORMATS:
        lorakit.read(files[fmt], allow_pickle=True, alpha=4)


def test_readme_states_the_number_of_cases():
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert f"fuzzed with {FUZZ_CASES:,} hypothesis cases" in readme
