"""Fast paths equal the reference path: the fused linear layer (outputs and gradients within 1e-5 in fp32, the same
dropout masks from the same seed, eager and compiled), fast dropout's rate, what a layer keeps for backward,
switching without copying, and hot-swap under torch.compile without recompiling."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.core import layers


def tiny(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def step(model, ids, fused: bool, seed=1):
    """Logits and every gradient of one training step on the fused (or the reference) path, from the same seed."""
    layers.use_fast(fused)
    try:
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(seed)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    finally:
        layers.use_fast(True)
    return out.logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a, b, tol):
    (la, ga), (lb, gb) = a, b
    assert (la - lb).abs().max() <= tol * max(1.0, lb.abs().max().item())
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= tol * max(1e-3, gb[n].abs().max().item()), n


CASES = {
    "dropout": dict(dropout=0.1),
    "no dropout": dict(dropout=0.0),
    "fast dropout": dict(dropout=0.2, fast_dropout=True),
    "biases trained": dict(dropout=0.1, bias="lora_only"),
    "rslora": dict(dropout=0.0, use_rslora=True, r=8),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_path_equals_reference_path(case, monkeypatch):
    m = tiny()
    lorakit.inject(m, lorakit.LoraConfig(**{"r": 4, "alpha": 8, "targets": "all-linear", "init": False,
                                            **CASES[case]}))
    m.train()
    calls = []
    monkeypatch.setattr(layers._LoraLinear, "apply", lambda *a, _f=layers._LoraLinear.apply: calls.append(1) or _f(*a))
    ids = torch.randint(0, 64, (3, 9))
    fused = step(m, ids, True)
    assert len(calls) == 14  # every linear layer of 2 blocks took the fused path
    assert_close(fused, step(m, ids, False), 1e-5)


def test_fused_path_with_a_weighted_stack_and_a_trained_base_weight():
    m = tiny()
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", init=False, dropout=0.1), name="a")
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=2, targets=["q_proj", "down_proj"], init=False, dropout=0.1),
                   name="b")
    lorakit.set_weights(m, {"a": 0.7, "b": -1.5})
    m.model.layers[0].self_attn.o_proj.weight.requires_grad_(True)  # a base weight trained too: dW is exact as well
    m.train()
    ids = torch.randint(0, 64, (2, 5))
    fused, reference = step(m, ids, True), step(m, ids, False)
    assert "model.layers.0.self_attn.o_proj.weight" in fused[1]
    assert_close(fused, reference, 1e-5)


def test_fused_path_in_bf16_with_fp32_factors():
    m = tiny().to(torch.bfloat16)
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", init=False, dropout=0.1))
    m.train()
    ids = torch.randint(0, 64, (2, 7))
    fused, reference = step(m, ids, True), step(m, ids, False)
    assert torch.equal(fused[0], reference[0]) or (fused[0] - reference[0]).abs().max() <= 0.05
    for n in reference[1]:
        assert (fused[1][n] - reference[1][n]).abs().max() <= 0.02 * max(1e-3, reference[1][n].abs().max().item()), n


def test_fast_dropout_drops_at_its_rate_and_rounds_p_to_1_over_32768():
    x = torch.ones(1000, 1000)
    for p in (0.05, 0.3):
        keep, noise = layers.dropout_draw(x, p, fast=True)
        assert keep.dtype == torch.uint8 and keep.shape == x.shape
        assert abs(1 - keep.float().mean().item() - p) < 0.003
        assert layers.drop_rate(p, True) == round(p * 32768) / 32768
        assert torch.equal(noise, keep.float() / (1 - layers.drop_rate(p, True)))
    a, b = layers.dropout_draw(x, 0.5, True)[0], layers.dropout_draw(x, 0.5, True)[0]
    assert not torch.equal(a, b)  # fresh masks at each call
    torch.manual_seed(3)
    keep, noise = layers.dropout_draw(x, 0.1, fast=False)
    torch.manual_seed(3)
    assert torch.equal(x * noise, torch.nn.functional.dropout(x, 0.1))  # exact: F.dropout's draw, bit for bit


def saved_bytes(fn) -> int:
    """Bytes of distinct storages that autograd keeps for backward while running fn (parameters excluded)."""
    seen = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_the_fused_path_keeps_x_and_a_byte_mask_not_float_copies():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 256))
    lorakit.inject(layer, lorakit.LoraConfig(r=8, targets=["0"], dropout=0.1))
    x = torch.randn(64, 256, requires_grad=True)
    fused, _ = saved_bytes(lambda: layer(x))
    layers.use_fast(False)
    try:
        reference, _ = saved_bytes(lambda: layer(x))
    finally:
        layers.use_fast(True)
    n = x.numel()
    assert fused <= 4 * n + n + 4 * 8 * 64  # x itself, one byte of mask per element, h (r x N)
    assert reference >= 4 * n + 4 * n  # PEFT's arithmetic: the noise and dropout(x), both float


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_switching_adapters_copies_no_weight():
    m = tiny()
    lorakit.inject(m, lorakit.LoraConfig(r=4, targets="all-linear", init=False), name="a")
    lorakit.inject(m, lorakit.LoraConfig(r=4, targets="all-linear", init=False), name="b")
    before = {n: p.data_ptr() for n, p in m.named_parameters()}
    with Ops() as seen:
        for s in ["a", "b", {"a": 0.5, "b": -1.0}, "a"]:
            lorakit.set_weights(m, s)
    assert not [op for op in seen.ops if "copy" in op or "clone" in op or "cat" in op], seen.ops
    assert before == {n: p.data_ptr() for n, p in m.named_parameters()}


def compiled_pair(tmp_path, prepare: bool):
    """A model with adapter a loaded (hot-swap prepared or not) compiled with the eager backend, an uncompiled twin,
    and the saved files of adapters a (r4, all-linear), b (r8, q/v) and c (r2, all-linear)."""
    base = tiny().eval()
    files = {}
    for name, r, targets in [("a", 4, "all-linear"), ("b", 8, ["q_proj", "v_proj"]), ("c", 2, "all-linear")]:
        m = copy.deepcopy(base)
        lorakit.inject(m, lorakit.LoraConfig(r=r, targets=targets, init=False))
        lorakit.save(m, tmp_path / f"{name}.safetensors")
        files[name] = tmp_path / f"{name}.safetensors"
    model, twin = copy.deepcopy(base), copy.deepcopy(base)
    for m in (model, twin):
        lorakit.load(m, files["a"], name="a")
    if prepare:
        lorakit.prepare_hotswap(model, max_rank=16)
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend="eager"), model, twin, files


SWAPS = [("load", "b"), ("set", {"a": 0.5, "b": -1.0}), ("load", "c"), ("set", "c"), ("delete", "a"),
         ("set", {"b": 1.0, "c": 2.0}), ("set", {})]


def do(m, op, arg, files):
    if op == "load":
        lorakit.load(m, files[arg], name=arg)
    elif op == "set":
        lorakit.set_weights(m, arg)
    else:
        lorakit.delete(m, arg)


def test_hotswap_loads_swaps_and_reweights_without_recompiling(tmp_path):
    fast, model, twin, files = compiled_pair(tmp_path, prepare=True)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert (fast(ids).logits - twin(ids).logits).abs().max() <= 1e-5
        graphs = counters["stats"]["unique_graphs"]
        for op, arg in SWAPS:
            do(model, op, arg, files)
            do(twin, op, arg, files)
            assert (fast(ids).logits - twin(ids).logits).abs().max() <= 1e-5, (op, arg)
    assert graphs == 1 and counters["stats"]["unique_graphs"] == graphs


def test_without_hotswap_a_swap_recompiles(tmp_path):  # what the counter above would see
    fast, model, twin, files = compiled_pair(tmp_path, prepare=False)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        fast(ids)
        do(model, "load", "b", files)
        fast(ids)
    assert counters["stats"]["unique_graphs"] > 1


def test_hotswap_refuses_what_would_not_fit_and_changes_nothing(tmp_path):
    _, model, _, files = compiled_pair(tmp_path, prepare=False)
    lorakit.prepare_hotswap(model, max_rank=5)
    with pytest.raises(lorakit.LoraError, match="rank 8 .* more than the 5"):
        lorakit.load(model, files["b"], name="b")
    assert lorakit.adapters(model) == ["a"]
    lorakit.load(model, files["c"], name="c")
    with pytest.raises(lorakit.LoraError, match="rank 6 together .* more than the 5"):
        lorakit.set_weights(model, {"a": 1.0, "c": 1.0})
    assert lorakit.active(model) == {"c": 1.0}
    with pytest.raises(lorakit.LoraError, match="max_rank"):
        lorakit.prepare_hotswap(model, max_rank=0)
    plain = tiny()
    lorakit.inject(plain, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.prepare_hotswap(plain, max_rank=4)
    with pytest.raises(lorakit.LoraError, match="did not prepare"):
        lorakit.inject(plain, lorakit.LoraConfig(r=2, targets=["k_proj"]), name="k")
    assert lorakit.adapters(plain) == ["default"]
    saved = tiny()
    lorakit.inject(saved, lorakit.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(lorakit.LoraError, match="modules_to_save"):
        lorakit.prepare_hotswap(saved, max_rank=4)


def test_hotswap_prepares_named_modules_that_have_no_adapter_yet(tmp_path):
    _, _, _, files = compiled_pair(tmp_path, prepare=False)  # b: r8 on q_proj and v_proj
    model = tiny().eval()
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj"], init=False), name="q")
    twin = copy.deepcopy(model)
    lorakit.prepare_hotswap(model, max_rank=10, target_modules=["q_proj", "v_proj"])
    fast = torch.compile(model, backend="eager")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        fast(ids)
        graphs = counters["stats"]["unique_graphs"]
        for op, arg in [("load", "b"), ("set", {"q": 1.0, "b": 0.5})]:
            do(model, op, arg, files)
            do(twin, op, arg, files)
            assert (fast(ids).logits - twin(ids).logits).abs().max() <= 1e-5
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_fused_path_trains_under_torch_compile():
    m = tiny()
    lorakit.inject(m, lorakit.LoraConfig(r=4, targets="all-linear", init=False))
    m.train()
    ids = torch.randint(0, 64, (2, 9))
    torch._dynamo.reset()
    loss = torch.compile(m, backend="aot_eager")(input_ids=ids, labels=ids).loss
    loss.backward()
    compiled = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    _, grads = step(m, ids, fused=False)
    assert compiled.keys() == grads.keys() and grads
    for n in grads:
        assert (compiled[n] - grads[n]).abs().max() <= 1e-5 * max(1e-3, grads[n].abs().max().item()), n
