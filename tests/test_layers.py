"""LoRA layers, every layer type x option: the math, merging, stacking, training, init (PEFT-style matrix)."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, LoraError
from lorakit.core import layers


class Net(nn.Module):
    """A layer under test, with a small nonlinear tail so outputs depend on every weight."""

    def __init__(self, layer, tail_in):
        super().__init__()
        self.layer, self.relu, self.head = layer, nn.ReLU(), nn.Linear(tail_in, 3)

    def forward(self, x):
        h = self.layer(x)
        return self.head(self.relu(h.movedim(1, -1) if h.dim() > 2 and not isinstance(self.layer, nn.Embedding) else h))


class ScaledEmbedding(nn.Embedding):
    """Gemma-style embedding that multiplies its output by a constant."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("embed_scale", torch.tensor(3.0))

    def forward(self, x):
        return super().forward(x) * self.embed_scale


g = torch.Generator().manual_seed(0)
LAYERS = {
    "linear": (lambda: nn.Linear(10, 20), 20, lambda: torch.randn(9, 10, generator=g)),
    "conv1d_t": (lambda: Conv1D(20, 10), 20, lambda: torch.randn(9, 10, generator=g)),
    "embedding": (lambda: nn.Embedding(30, 20, padding_idx=0), 20, lambda: torch.randint(0, 30, (9, 5), generator=g)),
    "scaled_embedding": (lambda: ScaledEmbedding(30, 20), 20, lambda: torch.randint(0, 30, (9, 5), generator=g)),
    "conv1d": (lambda: nn.Conv1d(4, 8, 3, padding=2, dilation=2, padding_mode="reflect"), 8,
               lambda: torch.randn(2, 4, 11, generator=g)),
    "conv2d": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1), 8, lambda: torch.randn(2, 4, 9, 9, generator=g)),
    "conv2d_dilated_circular": (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, padding_mode="circular"), 8,
                                lambda: torch.randn(2, 4, 8, 8, generator=g)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2), 8, lambda: torch.randn(2, 4, 7, 7, generator=g)),
    "conv2d_1x1": (lambda: nn.Conv2d(4, 8, 1), 8, lambda: torch.randn(2, 4, 5, 5, generator=g)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), 4, lambda: torch.randn(1, 2, 4, 4, 4, generator=g)),
}
OPTIONS = {
    "default": {},
    "rslora": {"use_rslora": True},
    "alpha_float": {"r": 4, "alpha": 0.5},
    "patterns": {"rank_pattern": {"layer": 6}, "alpha_pattern": {"layer": 3}},
    "gaussian": {"init": "gaussian"},
}
CASES = [(lk, ok) for lk in LAYERS for ok in OPTIONS]


def make(kind):
    torch.manual_seed(0)
    layer, tail, inp = LAYERS[kind]
    net = Net(layer(), tail).eval()
    return net, inp()


def adapted(kind, option="default", init=False, name="default", **extra):
    """(base, injected copy, input): the copy carries a non-identity adapter unless init=True."""
    base, x = make(kind)
    net = copy.deepcopy(base)
    opts = {"r": 4, "alpha": 8, "init": init, **OPTIONS[option], **extra}
    lorakit.inject(net, LoraConfig(targets=["layer"], **opts), name=name)
    if option == "gaussian":  # gaussian init leaves B = 0 (embeddings: A = 0): make the adapter act
        with torch.no_grad():
            (net.layer.lora_A if "embedding" in kind else net.layer.lora_B)[name].normal_()
    return base, net, x


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind,option", CASES)
def test_merged_equals_unmerged_equals_unload(kind, option):
    base, net, x = adapted(kind, option)
    with torch.no_grad():
        y = net(x)
        assert not torch.allclose(y, base(x)), "the adapter must change the output"
        lorakit.merge(net)
        close(net(x), y)
        lorakit.unmerge(net)
        close(net(x), y)
        plain = lorakit.unload(net, merge=True)
        close(plain(x), y)
    assert type(plain.layer) is type(base.layer)
    assert set(plain.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("kind,option", CASES)
def test_training_changes_adapter_parameters_only(kind, option):
    base, net, x = adapted(kind, option, dropout=0.0 if "embedding" in kind else 0.1)
    net.train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        net(x).sum().backward()
        opt.step()
        opt.zero_grad()
    for n, p in net.named_parameters():
        if ".lora_" in n:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"base parameter {n} changed"


@pytest.mark.parametrize("kind,option", CASES)
def test_save_load_round_trip(kind, option, tmp_path):
    base, net, x = adapted(kind, option, dropout=0.1)
    lorakit.save(net, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    assert lorakit.load(fresh, tmp_path / "a.safetensors") == "a"
    with torch.no_grad():
        close(fresh(x), net(x), rtol=0, atol=0)
    assert fresh.layer.lora_dropout["a"] == net.layer.lora_dropout["default"]


@pytest.mark.parametrize("kind", LAYERS)
def test_disabled_equals_base(kind):
    base, net, x = adapted(kind)
    with torch.no_grad():
        y = net(x)
        with lorakit.disabled(net):
            close(net(x), base(x), rtol=1e-6, atol=1e-7)
        close(net(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("kind", LAYERS)
def test_default_init_starts_as_the_base(kind):
    base, net, x = adapted(kind, init=True)
    with torch.no_grad():
        close(net(x), base(x), rtol=1e-6, atol=1e-7)


def delta(net, name):
    """ΔW of one adapter, measured through merge."""
    w0 = net.layer.weight.detach().clone()
    lorakit.set_weights(net, {name: 1.0})
    lorakit.merge(net)
    d = net.layer.weight.detach() - w0
    lorakit.unmerge(net)
    return d


@pytest.mark.parametrize("kind", LAYERS)
def test_weighted_and_negative_combinations_are_exact(kind):
    base, net, x = adapted(kind, name="a", r=4, alpha=8)
    lorakit.inject(net, LoraConfig(targets=["layer"], r=2, alpha=1, init=False), name="b")
    with torch.no_grad():
        if "embedding" in kind:  # default init has A = 0 for embeddings
            net.layer.lora_A["b"].normal_()
        combo = {"a": 0.7, "b": -1.3}
        lorakit.set_weights(net, combo)
        y = net(x)
        ref = copy.deepcopy(base)
        ref.layer.weight += 0.7 * delta(net, "a") - 1.3 * delta(net, "b")
        close(y, ref(x))
        # and against the formula W + Σ w·s·B·A, written out here for Linear
        if kind == "linear":
            lorakit.set_weights(net, combo)
            L = net.layer
            W = base.layer.weight + sum(w * L.lora_scale[n] * L.lora_B[n] @ L.lora_A[n] for n, w in combo.items())
            close(net.layer(x), F.linear(x, W, base.layer.bias))


def test_scale_is_alpha_over_r_or_sqrt_r():
    for cfg, s in [({"r": 16, "alpha": 32}, 2.0), ({"r": 16, "alpha": 32, "use_rslora": True}, 8.0),
                   ({"r": 4, "alpha": 0.5}, 0.125)]:
        _, net, _ = adapted("linear", **cfg)
        assert net.layer.lora_scale["default"] == s


class Counter(TorchFunctionMode):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.fn is None:
            self.calls.append(func)
        elif func is self.fn:
            self.calls.append(args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind,fn", [("linear", F.linear), ("conv2d", F.conv2d), ("conv2d_groups", F.conv2d)])
def test_several_adapters_cost_one_pair_of_products(kind, fn):
    base, net, x = adapted(kind, name="a")
    for n in ("b", "c"):
        lorakit.inject(net, LoraConfig(targets=["layer"], r=2, init=False), name=n)
    lorakit.set_weights(net, {"a": 1.0, "b": 0.5, "c": -2.0})
    with torch.no_grad(), reference_path(), Counter(fn) as c:
        net.layer(x)
    assert len(c.calls) == 3  # the base product and one pair for all three adapters
    if kind == "linear":  # the fused path: the base product, A·xᵀ, and B's product added into y in place
        with torch.no_grad(), Counter(None) as c:
            net.layer(x)
        assert [f for f in c.calls if f in (F.linear, torch.Tensor.matmul, torch.Tensor.addmm_)] == \
            [F.linear, torch.Tensor.matmul, torch.Tensor.addmm_]


@contextlib.contextmanager
def reference_path():
    layers.use_fast(False)
    try:
        yield
    finally:
        layers.use_fast(True)


def test_dropout_zero_does_not_copy_the_input():
    _, net, x = adapted("linear", dropout=0.0)
    net.train()
    with reference_path(), Counter(F.linear) as c:
        net.layer(x)
    assert c.calls[1][0] is x  # the A product reads the input itself
    _, net, x = adapted("linear", dropout=0.5)
    net.train()
    with reference_path(), Counter(F.linear) as c:
        net.layer(x)
    assert c.calls[1][0] is not x


def test_init_distributions():
    torch.manual_seed(0)
    lin = nn.Linear(1024, 64)
    lorakit.inject(lin_net := Net(lin, 64), LoraConfig(targets=["layer"], r=64, alpha=64))
    A, B = lin_net.layer.lora_A["default"], lin_net.layer.lora_B["default"]
    bound = 1 / 1024**0.5  # kaiming_uniform(a=√5) on (r, in) = U(-1/√in, 1/√in)
    assert A.abs().max() <= bound and A.abs().max() > 0.98 * bound
    assert abs(A.std().item() - bound / 3**0.5) < 0.02 * bound
    assert torch.count_nonzero(B) == 0
    lorakit.inject(gnet := Net(nn.Linear(1024, 64), 64), LoraConfig(targets=["layer"], r=16, init="gaussian"))
    assert abs(gnet.layer.lora_A["default"].std().item() - 1 / 16) < 0.003  # std, not variance, 1/r
    assert torch.count_nonzero(gnet.layer.lora_B["default"]) == 0
    lorakit.inject(enet := Net(nn.Embedding(1000, 64), 64), LoraConfig(targets=["layer"], r=32))
    assert torch.count_nonzero(enet.layer.lora_A["default"]) == 0
    assert abs(enet.layer.lora_B["default"].std().item() - 1.0) < 0.05


@pytest.mark.parametrize("kind", ["linear", "conv1d_t", "embedding", "conv2d_groups"])
def test_100_merge_unmerge_cycles_do_not_drift(kind):
    base, net, _ = adapted(kind)
    w0 = base.layer.weight.detach()
    for _ in range(100):
        lorakit.merge(net)
        lorakit.unmerge(net)
    w = net.layer.weight.detach()
    assert ((w - w0).norm() / w0.norm()).item() <= 1e-6
    assert ((w - w0).abs().max() / w0.abs().max()).item() <= 1e-6


def test_safe_merge_refuses_nan_and_changes_nothing():
    _, net, x = adapted("linear")
    lorakit.inject(net.head_net if hasattr(net, "head_net") else net, LoraConfig(targets=["head"], init=False), name="h")
    lorakit.set_weights(net, ["default", "h"])
    with torch.no_grad():
        net.head.lora_B["h"][0, 0] = float("inf")
    w_layer, w_head = net.layer.weight.clone(), net.head.weight.clone()
    with pytest.raises(LoraError, match="head"):
        lorakit.merge(net, safe=True)
    assert torch.equal(net.layer.weight, w_layer) and torch.equal(net.head.weight, w_head)
    assert not net.layer.lora_merged and not net.head.lora_merged


def test_base_checkpoint_loads_strictly_into_an_injected_model():
    base, net, x = adapted("linear")
    sd = {k: v + 1 for k, v in base.state_dict().items()}
    assert set(net.state_dict()) > set(sd)  # the adapter's own keys are extra
    net.load_state_dict(sd)  # strict: base names are unchanged
    assert torch.equal(net.layer.weight, sd["layer.weight"])
    with pytest.raises(RuntimeError, match="layer.wieght"):
        net.load_state_dict({**sd, "layer.wieght": sd["layer.weight"]})


def test_only_active_adapters_train():
    _, net, _ = adapted("linear", name="a")
    lorakit.inject(net, LoraConfig(targets=["layer"], init=False), name="b")
    assert lorakit.active(net) == {"b": 1.0}
    assert not net.layer.lora_A["a"].requires_grad and net.layer.lora_A["b"].requires_grad
    lorakit.set_weights(net, {"a": 0.5})
    assert net.layer.lora_A["a"].requires_grad and not net.layer.lora_B["b"].requires_grad
    assert not any(p.requires_grad for n, p in net.named_parameters() if ".lora_" not in n)
    lorakit.set_weights(net, {})
    assert not any(p.requires_grad for p in net.parameters())


def test_set_weights_checks_names_and_merge_state():
    _, net, x = adapted("linear", name="a")
    with pytest.raises(LoraError, match="'nope'.*\\['a'\\]"):
        lorakit.set_weights(net, {"nope": 1.0})
    lorakit.merge(net)
    with pytest.raises(LoraError, match="unmerge"):
        lorakit.set_weights(net, {"a": 0.5})


def test_disabled_on_a_merged_model_gives_the_base_and_remerges():
    base, net, x = adapted("linear")
    with torch.no_grad():
        y = net(x)
        lorakit.merge(net)
        with lorakit.disabled(net):
            close(net(x), base(x))
        assert net.layer.lora_merged
        close(net(x), y)


@pytest.mark.parametrize("mode,trainable", [("none", set()), ("lora_only", {"layer.bias"}),
                                            ("all", {"layer.bias", "head.bias"})])
def test_bias_modes(mode, trainable):
    _, net, _ = adapted("linear", bias=mode)
    got = {n for n, p in net.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert got == trainable


def test_modules_to_save_train_a_copy_and_combine_linearly():
    base, net, x = adapted("linear", modules_to_save=["head"])
    assert net.head.lora_copies["default"].weight.requires_grad and not net.head.weight.requires_grad
    with torch.no_grad():
        net.head.lora_copies["default"].weight.add_(1.0)
        y = net(x)
        assert not torch.allclose(y, adapted("linear")[1](x))
        with lorakit.disabled(net):
            close(net(x), base(x))
        lorakit.set_weights(net, {"default": 0.5})
        ref = copy.deepcopy(net)
        lorakit.unload(ref, merge=True)
        close(ref.head.weight, base.head.weight + 0.5)
        close(net(x), ref(x))


def test_half_precision_base_merges_a_delta_formed_in_fp32():
    """A bf16 base keeps fp32 factors and merge forms ΔW in fp32: on a zero base weight the merged weight is ΔW
    correctly rounded, within half a bf16 ulp (2^-8 relative; measured 0.0039). ΔW formed from bf16-rounded factors
    is off by 5 % there (measured 0.054: the rank-8 sum cancels)."""
    base, _ = make("linear")
    net = copy.deepcopy(base).to(torch.bfloat16)
    lorakit.inject(net, LoraConfig(targets=["layer"], r=8, alpha=16, init=False))
    layer, x = net.layer, torch.randn(9, 10, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert layer.lora_A["default"].dtype == layer.lora_B["default"].dtype == torch.float32
    with torch.no_grad():
        y = net(x)
        lorakit.merge(net)
        close(net(x), y, rtol=0.01, atol=0.01)  # bf16 rounding of the merged weight (measured 0.004)
        lorakit.unmerge(net)
        layer.weight.zero_()
        exact = 2.0 * layer.lora_B["default"].double() @ layer.lora_A["default"].double()
        lorakit.merge(net)
        assert ((layer.weight.double() - exact).abs() / exact.abs()).max() <= 2 ** -8 + 1e-6


def test_unload_without_merge_drops_the_adapter():
    base, net, x = adapted("linear", modules_to_save=["head"])
    lorakit.merge(net)
    plain = lorakit.unload(net, merge=False)
    with torch.no_grad():
        close(plain(x), base(x))
    assert lorakit.adapters(plain) == [] and not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())


def test_delete_adapter():
    base, net, x = adapted("linear", name="a")
    lorakit.inject(net, LoraConfig(targets=["layer"], init=False), name="b")
    lorakit.delete(net, "b")
    assert lorakit.adapters(net) == ["a"] and "b" not in net.layer.lora_A
    lorakit.delete(net, "a")
    assert type(net.layer) is nn.Linear
    with torch.no_grad():
        close(net(x), base(x), rtol=0, atol=0)


def test_summary_counts():
    _, net, _ = adapted("linear", r=4)
    s = lorakit.summary(net)
    assert s.adapters["default"]["params"] == 4 * 10 + 20 * 4 and s.trainable == 120
    assert s.total == 120 + 10 * 20 + 20 + 20 * 3 + 3
    assert "trainable params: 120" in str(s)


def test_grouped_conv_rank_must_divide_groups():
    base, x = make("conv2d_groups")
    net = copy.deepcopy(base)
    with pytest.raises(LoraError, match="groups=2"):
        lorakit.inject(net, LoraConfig(targets=["layer"], r=3))
    assert type(net.layer) is nn.Conv2d and lorakit.adapters(net) == []


def test_merge_refuses_a_tied_weight():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    lorakit.inject(model, LoraConfig(targets=["wte"], init=False))
    before = model.transformer.wte.weight.clone()
    with pytest.raises(LoraError, match="tied to.*lm_head"):
        lorakit.merge(model)
    assert torch.equal(model.transformer.wte.weight, before)
