"""Injected models pickle and copy; factors stay fp32 on half-precision bases; unmerge restores weights bit for bit."""

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, LoraError, LoraLayer
from lorakit.llm.train import TrainConfig
from lorakit.options import build


class Net(nn.Module):
    """One module of each kind lorakit adapts, plus a head kept as a modules_to_save copy."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.c1d = nn.Embedding(12, 8), nn.Linear(8, 8), Conv1D(8, 8)
        self.conv, self.head = nn.Conv1d(8, 8, 3, padding=1, groups=2), nn.Linear(8, 3)

    def forward(self, x):
        h = self.c1d(torch.relu(self.lin(self.emb(x))))
        return self.head(self.conv(h.transpose(1, 2)).transpose(1, 2))


TARGETS = ["emb", "lin", "c1d", "conv"]
X = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(1))


def injected(dtype=torch.float32, **opts):
    """A Net with adapters "a" (active, with a head copy) and "b", both non-identity."""
    torch.manual_seed(0)
    net = Net().to(dtype).eval()
    lorakit.inject(net, LoraConfig(r=4, targets=TARGETS, init=False, modules_to_save=["head"], **opts), name="b")
    lorakit.inject(net, LoraConfig(r=2, targets=TARGETS, init=False, **opts), name="a")
    return net


def weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items() if ".lora_" not in k}


ROUND_TRIPS = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "deepcopy": copy.deepcopy,
    "torch.save": lambda m: torch.load(io.BytesIO(_saved(m)), weights_only=False),
}


def _saved(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    return buf.getvalue()


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("how", ROUND_TRIPS)
def test_injected_model_round_trips_and_its_adapters_still_work(how, merged):
    net = injected()
    base = weights(lorakit.unload(copy.deepcopy(net), merge=False))
    if merged:
        lorakit.merge(net)
    with torch.no_grad():
        y = net(X)
        new = ROUND_TRIPS[how](net)
        assert torch.equal(new(X), y)
        assert isinstance(new.lin, LoraLayer) and isinstance(new.lin, nn.Linear) and type(new.lin) is type(net.lin)
        assert lorakit.adapters(new) == ["b", "a"] and lorakit.active(new) == {"a": 1.0}
        lorakit.unmerge(new)
        assert all(torch.equal(weights(new)[k], v) for k, v in base.items())
        lorakit.unmerge(net)
        for m in (new, net):
            lorakit.set_weights(m, {"b": 0.5, "a": -1.0})
        y2 = new(X)
        assert torch.equal(y2, net(X)) and not torch.equal(y2, y)
        lorakit.merge(new)
        torch.testing.assert_close(new(X), y2, rtol=1e-5, atol=1e-6)
    new.train()
    lorakit.unmerge(new)
    new(X).sum().backward()
    assert new.lin.lora_A["b"].grad is not None and new.lin.lora_A["a"].grad is not None


def test_torch_save_loads_in_a_fresh_process(tmp_path):
    """A fresh interpreter has made none of lorakit's layer classes yet: loading must make them."""
    net = injected()
    lorakit.merge(net)
    base = weights(lorakit.unload(copy.deepcopy(net), merge=False))
    torch.save({"model": net, "x": X, "y": net(X).detach(), "base": base}, tmp_path / "m.pt")
    code = f"""
import torch, lorakit, sys
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)
m = d["model"]
assert torch.equal(m(d["x"]), d["y"])
lorakit.unmerge(m)
assert all(torch.equal(m.state_dict()[k], v) for k, v in d["base"].items())
lorakit.set_weights(m, ["b"])
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factors_are_fp32_on_a_half_precision_base(dtype):
    net = injected(dtype)
    for m in (net.emb, net.lin, net.c1d, net.conv):
        assert {p.dtype for p in [*m.lora_A.values(), *m.lora_B.values()]} == {torch.float32}
        assert m.weight.dtype == dtype
    net.train()
    y = net(X)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    for m in (net.emb, net.lin, net.c1d, net.conv):
        for p in (m.lora_A["a"], m.lora_B["a"]):
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
        assert m.weight.grad is None
    with torch.no_grad():
        net.eval()
        y = net(X)
        lorakit.merge(net)
        torch.testing.assert_close(net(X), y, rtol=0.05, atol=0.05)  # half-precision rounding of the merged weight


def test_factor_dtype_base_keeps_the_base_dtype():
    net = injected(torch.bfloat16, factor_dtype="base")
    assert {p.dtype for n, p in net.named_parameters() if ".lora_" in n and "lora_copies" not in n} == {torch.bfloat16}
    assert net(X).dtype == torch.bfloat16
    net32 = injected(torch.float32, factor_dtype="fp32")  # an fp32 base: fp32 either way
    assert net32.lin.lora_A["a"].dtype == torch.float32


def test_factor_dtype_is_checked_and_is_a_flag():
    with pytest.raises(LoraError, match="factor_dtype"):
        LoraConfig(factor_dtype="fp16")
    assert build(TrainConfig, {"factor_dtype": "base"}).lora.factor_dtype == "base"
    with pytest.raises(LoraError, match="factor_dtype"):
        build(TrainConfig, {"factor_dtype": "bf16"})
    assert LoraConfig.from_dict(LoraConfig(factor_dtype="base").to_dict()).factor_dtype == "base"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_unmerge_and_disabled_restore_weights_bit_for_bit(dtype):
    net = injected(dtype, factor_dtype="base")
    w0 = weights(net)
    lorakit.merge(net)
    merged = weights(net)
    assert not torch.equal(merged["lin.weight"], w0["lin.weight"])
    for _ in range(10):
        with lorakit.disabled(net):
            assert all(torch.equal(weights(net)[k], v) for k, v in w0.items())
        assert all(torch.equal(weights(net)[k], v) for k, v in merged.items())
        lorakit.unmerge(net)
        assert all(torch.equal(weights(net)[k], v) for k, v in w0.items())
        lorakit.merge(net)
    lorakit.unmerge(net)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unmerge_after_the_factors_changed_restores_the_original_weights(dtype):
    net = injected(dtype)
    w0 = weights(net)
    lorakit.merge(net)
    with torch.no_grad():
        for m in (net.emb, net.lin, net.c1d, net.conv):
            m.lora_B["a"].mul_(3).add_(0.5)  # e.g. a training step, or load_state_dict of other factors, while merged
    with pytest.raises(LoraError, match="unmerge"):
        lorakit.set_weights(net, {"a": 2.0, "b": 1.0})
    lorakit.unmerge(net)
    assert all(torch.equal(weights(net)[k], v) for k, v in w0.items())
    lorakit.merge(net)  # and merging again uses the new factors
    with torch.no_grad():
        y = net(X)
        lorakit.unmerge(net)
        tol = 1e-5 if dtype == torch.float32 else 0.05  # half precision: rounding of the merged weights
        torch.testing.assert_close(net(X), y, rtol=tol, atol=tol * y.abs().max().item())


def test_unload_with_merge_keeps_no_copy():
    net = injected()
    lorakit.merge(net)
    assert net.lin.lora_premerge is not None
    lin = net.lin
    lorakit.unload(net, merge=True)
    assert type(lin) is nn.Linear and not any(k.startswith("lora_") for k in vars(lin))
