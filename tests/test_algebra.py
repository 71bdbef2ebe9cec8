"""Adapter algebra (lorakit.algebra), each feature checked against its definition: combine (cat exact, svd optimal,
ties/dare/ties-svd/dare-svd/linear as PEFT defines them), resize, extract, the burn-out guard, and the commands.

Adapters are built directly in canonical form (A r x in, B out x r; conv A r x in x kh x kw, B out x r x 1 x 1;
embedding A r x num, B dim x r) with tiny random tensors; expected values are computed by hand in float64.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import Adapter, LoraConfig, LoraError, ModuleLora
from lorakit.algebra import Part, combine, extract, guard, resize
from lorakit.core.config import scale
from lorakit.formats.adapter import apply, from_model

F64 = torch.float64

# --- helpers -----------------------------------------------------------------------------------------------------
# base weight shapes by module: linear (out, in), embedding (num, dim), conv (out, in, kh, kw)
SHAPES = {"lin": ("linear", [10, 12]), "lin2": ("linear", [12, 10]), "emb": ("embedding", [20, 6]),
          "conv3": ("conv", [6, 4, 3, 3]), "conv1": ("conv", [6, 4, 1, 1])}


def factors(kind: str, shape: list[int], r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "embedding":
        a_shape, b_shape = (r, shape[0]), (shape[1], r)
    elif kind == "conv":
        a_shape, b_shape = (r, *shape[1:]), (shape[0], r, *[1] * (len(shape) - 2))
    else:
        a_shape, b_shape = (r, shape[1]), (shape[0], r)
    return torch.randn(a_shape, generator=g), torch.randn(b_shape, generator=g)


def make(spec: dict[str, tuple[int, float]], seed: int, rslora: bool = False, base: str = "tiny") -> Adapter:
    """An adapter with random factors: spec = {module: (r, alpha)} over SHAPES."""
    g = torch.Generator().manual_seed(seed)
    a = Adapter({}, rslora, base_model=base)
    for path, (r, alpha) in spec.items():
        kind, shape = SHAPES[path]
        A, B = factors(kind, shape, r, g)
        a.modules[path] = ModuleLora(A, B, alpha, kind)
        a.fingerprint[path] = shape
    return a


def deltas(a: Adapter) -> dict[str, torch.Tensor]:
    """s·B·A per module, float64, conv kernels flattened (out x in·k)."""
    return {p: scale(m.r, m.alpha, a.use_rslora) * (m.B.to(F64).flatten(1) @ m.A.to(F64).flatten(1))
            for p, m in a.modules.items()}


def exact(inputs) -> dict[str, torch.Tensor]:
    """Σ wᵢ·sᵢ·Bᵢ·Aᵢ per module, over the inputs that have the module."""
    out: dict[str, torch.Tensor] = {}
    for a, w, *_ in inputs:
        for p, d in deltas(a).items():
            out[p] = out[p] + w * d if p in out else w * d
    return out


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.to(F64) - y.to(F64)).norm() / y.to(F64).norm())


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0][:, :k]


def spectrum_adapter(sigma: list[float], out: int = 10, inp: int = 12, rslora: bool = False) -> Adapter:
    """One linear module 'lin' whose ΔW has exactly the singular values `sigma` (scale 1)."""
    g = torch.Generator().manual_seed(7)
    r = len(sigma)
    U, V = orthonormal(out, r, g), orthonormal(inp, r, g)
    B = (U * torch.tensor(sigma, dtype=F64)).float()
    alpha = math.sqrt(r) if rslora else r
    return Adapter({"lin": ModuleLora(V.T.float().contiguous(), B, alpha, "linear")}, rslora,
                   fingerprint={"lin": [out, inp]})


# --- combine: cat is exact ---------------------------------------------------------------------------------------
CAT_CASES = {
    "different-ranks": lambda: [(make({"lin": (2, 2)}, 0), 1.0), (make({"lin": (5, 5)}, 1), 1.0)],
    "different-alphas": lambda: [(make({"lin": (3, 1)}, 0), 1.0), (make({"lin": (3, 24)}, 1), 1.0)],
    "per-module-alphas": lambda: [(make({"lin": (3, 1), "lin2": (3, 7)}, 0), 0.6),
                                  (make({"lin": (2, 16), "lin2": (2, 0.5)}, 1), 0.9)],
    "rslora-mixed-with-plain": lambda: [(make({"lin": (4, 8), "lin2": (9, 3)}, 0, rslora=True), 1.0),
                                        (make({"lin": (4, 8), "lin2": (2, 3)}, 1), 0.5)],
    "conv-3x3": lambda: [(make({"conv3": (2, 4)}, 0), 0.7), (make({"conv3": (3, 1)}, 1), 1.3)],
    "conv-1x1": lambda: [(make({"conv1": (2, 4)}, 0), 0.7), (make({"conv1": (3, 1)}, 1), 1.3)],
    "embedding": lambda: [(make({"emb": (2, 4)}, 0), 0.7), (make({"emb": (4, 2)}, 1), 1.0)],
    "negative-weights": lambda: [(make({"lin": (3, 6)}, 0), -0.4), (make({"lin": (2, 2)}, 1), -1.5),
                                 (make({"lin": (4, 4)}, 2), 0.7)],
    "modules-only-some-inputs-have": lambda: [(make({"lin": (2, 2), "conv3": (2, 2)}, 0), 0.8),
                                              (make({"lin": (3, 3), "emb": (2, 2)}, 1), -0.5),
                                              (make({"lin2": (3, 1)}, 2), 1.0)],
}


@pytest.mark.parametrize("case", list(CAT_CASES))
def test_cat_is_exact(case):
    inputs = CAT_CASES[case]()
    out = combine(inputs, "cat")
    want = exact(inputs)
    assert set(out.modules) == set(want)
    got = deltas(out)
    for path in want:
        assert rel(got[path], want[path]) <= 1e-6, path
        have = [a.modules[path] for a, *_ in inputs if path in a.modules]
        m = out.modules[path]
        assert m.r == sum(x.r for x in have)  # nothing dropped
        assert m.kind == have[0].kind and m.A.shape[1:] == have[0].A.shape[1:] and m.B.shape[2:] == have[0].B.shape[2:]
    assert not out.use_rslora and out.fingerprint == {p: s for a, *_ in inputs for p, s in a.fingerprint.items()}


class TinyNet(nn.Module):
    """Every layer kind a combined adapter covers: embedding, 3x3 conv, 1x1 conv, grouped conv, linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv3 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.gconv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.lin = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.emb(ids).reshape(ids.shape[0], 2, 2, 2 * ids.shape[1])  # (b, 2, 2, 2·t)
        h = self.gconv(torch.tanh(self.conv1(torch.tanh(self.conv3(h)))))
        return self.lin(h.mean((2, 3)))


IDS = torch.randint(0, 20, (3, 4), generator=torch.Generator().manual_seed(0))


def two_adapters(targets_b=("lin", "conv3", "gconv")):
    """A TinyNet with adapters "a" (r=2, all modules) and "b" (r=4, rsLoRA, some modules), both non-identity."""
    torch.manual_seed(0)
    base = TinyNet().eval()
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=2, alpha=3, init=False, targets=["emb", "conv3", "conv1", "gconv", "lin"]), "a")
    lorakit.inject(model, LoraConfig(r=4, alpha=2, init=False, use_rslora=True, targets=list(targets_b)), "b")
    return base, model


def test_combined_adapter_loaded_equals_the_stack(tmp_path):
    base, model = two_adapters()
    w = {"a": 0.8, "b": -0.5}
    lorakit.set_weights(model, w)
    with torch.no_grad():
        want = model(IDS)
        assert not torch.allclose(want, base(IDS), atol=1e-3)
    out = combine([(from_model(model, n), x, n) for n, x in w.items()], "cat")

    fresh = copy.deepcopy(base)
    apply(fresh, out, "combined")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), want, atol=1e-5, rtol=1e-5)

    path = lorakit.formats.io.write(out, tmp_path / "combined.safetensors")
    fresh = copy.deepcopy(base)
    assert lorakit.load(fresh, path) == "combined"
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), want, atol=1e-5, rtol=1e-5)


def test_cat_of_a_grouped_conv_equals_the_layers_own_delta():
    base, model = two_adapters()
    w = {"a": 1.3, "b": -0.7}
    lorakit.set_weights(model, w)
    want = model.gconv.lora_delta(w).detach()
    out = combine([(from_model(model, n), x) for n, x in w.items()], "cat")
    assert out.modules["gconv"].r == 6 and out.modules["gconv"].B.shape[1] == 3  # grouped: r / groups columns
    fresh = copy.deepcopy(base)
    apply(fresh, out, "c")
    got = fresh.gconv.lora_delta({"c": 1.0}).detach()
    assert rel(got, want) <= 1e-6
    for method in ("svd", "ties-svd"):
        with pytest.raises(LoraError, match="'gconv'.*grouped"):
            combine([(from_model(model, n), x) for n, x in w.items()], method, density=0.5)


def test_header_records_inputs_weights_and_method(tmp_path):
    inputs = [(make({"lin": (2, 2)}, 0, base="org/base"), 0.7, "style.safetensors"),
              (make({"lin": (3, 3)}, 1, base="org/base"), -0.4, "subject.safetensors")]
    out = combine(inputs, "svd", rank=2)
    path = lorakit.formats.io.write(out, tmp_path / "c.safetensors")
    with safe_open(str(path), "pt") as f:
        history = json.loads(f.metadata()["history"])
    assert history["method"] == "svd" and history["rank"] == 2
    assert [(i["source"], i["weight"]) for i in history["inputs"]] == [("style.safetensors", 0.7),
                                                                      ("subject.safetensors", -0.4)]
    assert lorakit.read(path)[0].history == history
    assert lorakit.read(path)[0].base_model == "org/base"


# --- combine: svd is optimal -------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5, None])
def test_svd_is_the_best_rank_k_approximation(k):
    inputs = [(make({"lin": (4, 8), "conv3": (3, 3), "emb": (2, 2)}, 0), 0.7),
              (make({"lin": (3, 1), "conv3": (4, 2), "emb": (3, 6)}, 1, rslora=True), -0.4)]
    out = combine(inputs, "svd", rank=k)
    want, got = exact(inputs), deltas(out)
    for path, D in want.items():
        sigma = torch.linalg.svdvals(D)
        kk = k or max(a.modules[path].r for a, _ in inputs)  # default: the largest input rank
        assert out.modules[path].r == kk
        optimum = float(sigma[kk:].pow(2).sum().sqrt())  # Eckart-Young
        assert abs(float((D - got[path]).norm()) - optimum) <= 1e-5 * float(D.norm()), path


SIGMA = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]  # Σσ² = 85.3125, Σσ = 15.75


@pytest.mark.parametrize("rule, rank, want", [
    ("energy=0.9", None, 2),       # 80/85.31 = 0.938 ≥ 0.9; 64/85.31 = 0.750 is not
    ("energy=0.95", None, 3),      # 0.938 < 0.95 ≤ 84/85.31
    ("fro=0.95", None, 2),         # kohya's sv_fro: Σσ²[:k]/Σσ² ≥ 0.95² = 0.9025
    ("fro=0.999", None, 5),        # ≥ 0.998: 85.25/85.31 = 0.99927
    ("ratio=5", None, 3),          # σ ≥ 8/5: 8, 4, 2
    ("ratio=10", None, 4),         # σ ≥ 0.8
    ("cumulative=0.9", None, 4),   # Σσ[:k]/Σσ: 0.508, 0.762, 0.889, 0.952
    ("cumulative=0.5", None, 1),
    ("cumulative=0.9", 2, 2),      # capped at --rank
])
def test_dynamic_rank_rules_pick_the_rank_their_definitions_say(rule, rank, want):
    a = spectrum_adapter(SIGMA)
    assert torch.allclose(torch.linalg.svdvals(deltas(a)["lin"])[:6], torch.tensor(SIGMA, dtype=F64), atol=1e-5)
    assert combine([(a, 1.0)], "svd", rank=rank, dynamic=rule).modules["lin"].r == want
    assert resize(a, rank=rank, dynamic=rule)[0].modules["lin"].r == want


def test_bad_dynamic_rules_are_refused():
    a = spectrum_adapter(SIGMA)
    for rule in ("energy", "volume=0.5", "energy=1.5", "ratio=0.5"):
        with pytest.raises(LoraError, match="dynamic rank rule"):
            combine([(a, 1.0)], "svd", dynamic=rule)


def test_clamp_quantile_bounds_the_factor_entries():
    inputs = [(make({"lin": (4, 4)}, 0), 1.0), (make({"lin": (4, 4)}, 1), 1.0)]
    free = combine(inputs, "svd", rank=4).modules["lin"]
    clamped = combine(inputs, "svd", rank=4, clamp=0.9).modules["lin"]
    hi = torch.quantile(torch.cat([free.B.flatten(), free.A.flatten()]).abs(), 0.9)
    assert (free.B.abs() > hi).any() or (free.A.abs() > hi).any()  # something to clip
    assert max(clamped.B.abs().max(), clamped.A.abs().max()) <= hi * (1 + 1e-6)
    torch.testing.assert_close(clamped.B, free.B.clamp(-hi, hi), atol=1e-6, rtol=0)
    torch.testing.assert_close(clamped.A, free.A.clamp(-hi, hi), atol=1e-6, rtol=0)


# --- combine: against PEFT's add_weighted_adapter ----------------------------------------------------------------
class PeftNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv2d(4, 8, 3)
        self.emb = nn.Embedding(16, 8)

    def forward(self, x):
        return x


PEFT_TARGETS = ["lin", "conv", "emb"]


def peft_pair(r_a=4, r_b=6, rslora=False):
    """A PeftNet with PEFT adapters "one" (r_a, alpha 8) and "two" (r_b, alpha 3), init_lora_weights=False; the base."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = PeftNet()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r_a, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False, use_rslora=rslora), adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(r=r_b, lora_alpha=3, target_modules=PEFT_TARGETS, init_lora_weights=False,
                                           use_rslora=rslora))
    return base, model


def peft_to_canonical(model, name: str) -> Adapter:
    """PEFT adapter `name` in lorakit's canonical form (the same tensors; PEFT's layouts are lorakit's)."""
    import peft

    a = Adapter({})
    for path, m in model.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            if name in m.lora_A:
                kind = "conv" if isinstance(m.base_layer, nn.Conv2d) else "linear"
                A, B = m.lora_A[name].weight, m.lora_B[name].weight
            else:
                A, B, kind = m.lora_embedding_A[name], m.lora_embedding_B[name], "embedding"
            a.modules[path] = ModuleLora(A.detach().clone(), B.detach().clone(), m.lora_alpha[name], kind)
            a.fingerprint[path] = list(m.base_layer.weight.shape)
            a.use_rslora = m.scaling[name] != m.lora_alpha[name] / m.r[name]
    return a


def peft_deltas(model, name: str) -> dict[str, torch.Tensor]:
    import peft

    return {p: m.get_delta_weight(name).detach() for p, m in model.base_model.model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and (name in m.lora_A or name in m.lora_embedding_A)}


def lorakit_deltas(base, adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's ΔW per module in each layer's weight layout, as lorakit's layers compute it once loaded."""
    model = copy.deepcopy(base)
    apply(model, adapter, "x")
    return {p: m.lora_delta({"x": 1.0}).detach() for p, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}


def check_same(got: dict, want: dict):
    assert set(got) == set(want)
    for p in want:
        torch.testing.assert_close(got[p], want[p], atol=1e-5, rtol=1e-5, msg=lambda s, p=p: f"{p}: {s}")


@pytest.mark.parametrize("majority", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.5, 0.2])
def test_ties_svd_equals_peft(majority, density):
    base, model = peft_pair()
    weights = [0.7, -0.4]
    model.add_weighted_adapter(["one", "two"], weights, "m", combination_type="ties_svd", density=density,
                               majority_sign_method=majority)
    out = combine([(peft_to_canonical(model, "one"), weights[0]), (peft_to_canonical(model, "two"), weights[1])],
                  "ties-svd", density=density, majority=majority)
    check_same(lorakit_deltas(base, out), peft_deltas(model, "m"))


@pytest.mark.parametrize("method, peft_type, ranks", [("linear", "linear", (4, 4)), ("cat", "cat", (4, 6)),
                                                      ("svd", "svd", (4, 6))])
def test_linear_cat_svd_equal_peft(method, peft_type, ranks):
    base, model = peft_pair(*ranks)
    weights = [0.7, -0.4]
    model.add_weighted_adapter(["one", "two"], weights, "m", combination_type=peft_type)
    out = combine([(peft_to_canonical(model, "one"), weights[0]), (peft_to_canonical(model, "two"), weights[1])], method)
    check_same(lorakit_deltas(base, out), peft_deltas(model, "m"))


def test_rslora_inputs_lorakit_is_right_peft_is_off_by_sqrt_r():
    from peft.utils.merge_utils import ties

    base, model = peft_pair(4, 4, rslora=True)
    weights, density, k = [1.0, 0.6], 0.5, 4
    model.add_weighted_adapter(["one", "two"], weights, "m", combination_type="ties_svd", density=density)
    a, b = peft_to_canonical(model, "one"), peft_to_canonical(model, "two")
    assert a.use_rslora and b.use_rslora
    out = combine([(a, weights[0]), (b, weights[1])], "ties-svd", density=density)
    got, theirs = lorakit_deltas(base, out), peft_deltas(model, "m")
    # the reference: PEFT's own TIES on each input's correctly scaled ΔW, then the truncated SVD, in float64
    src = {n: peft_deltas(model, n) for n in ("one", "two")}
    for path in got:
        D = ties([src["one"][path].double(), src["two"][path].double()], torch.tensor(weights, dtype=F64), density, "total")
        flat = D.T if path == "emb" else D.flatten(1)
        U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
        ref = U[:, :k] * S[:k] @ Vh[:k]
        ref = ref.T if path == "emb" else ref.reshape(D.shape)
        torch.testing.assert_close(got[path].double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs[path].double(), math.sqrt(k) * ref, atol=1e-4, rtol=1e-5)  # PEFT: ×√r


def test_ties_with_weights_one_equals_ties_svd_at_full_rank():
    inputs = [(make({"lin": (3, 6), "conv3": (2, 2)}, 0), 1.0), (make({"lin": (4, 2), "conv3": (3, 1)}, 1), 1.0)]
    for majority in ("total", "frequency"):
        t = combine(inputs, "ties", density=0.4, majority=majority, rank=100)
        ts = combine(inputs, "ties-svd", density=0.4, majority=majority, rank=100)
        for path in t.modules:
            assert t.modules[path].r == min(deltas(t)[path].shape)  # full rank: nothing truncated
            assert rel(deltas(t)[path], deltas(ts)[path]) <= 1e-6


def test_dare_density_one_equals_svd():
    inputs = [(make({"lin": (3, 6), "emb": (2, 2)}, 0), 0.7), (make({"lin": (4, 2), "emb": (3, 1)}, 1), -0.4)]
    dare, svd = deltas(combine(inputs, "dare", density=1.0, rank=3)), deltas(combine(inputs, "svd", rank=3))
    for path in svd:
        assert rel(dare[path], svd[path]) <= 1e-6


def test_dare_is_unbiased_and_seeded():
    inputs = [(make({"lin": (3, 6)}, 0), 0.7), (make({"lin": (4, 2)}, 1), -0.4)]
    want = exact(inputs)["lin"]
    full = 10  # full rank: the result is the dropped-and-rescaled sum itself
    runs = [deltas(combine(inputs, "dare", density=0.5, rank=full, seed=s))["lin"] for s in range(300)]
    assert rel(runs[0], want) > 0.3  # one draw is far off ...
    assert rel(torch.stack(runs).mean(0), want) < 0.1  # ... the mean over seeds approaches the exact sum
    assert not torch.equal(runs[0], runs[1])
    again = deltas(combine(inputs, "dare", density=0.5, rank=full, seed=0))["lin"]
    assert torch.equal(again, runs[0])
    d1 = combine(inputs, "dare-svd", density=0.5, seed=3)
    d2 = combine(inputs, "dare-svd", density=0.5, seed=3)
    assert torch.equal(d1.modules["lin"].A, d2.modules["lin"].A)


# --- combine: refusals -------------------------------------------------------------------------------------------
def test_different_base_shapes_are_refused_naming_the_module():
    a = make({"lin": (2, 2)}, 0)
    b = make({"lin": (2, 2)}, 1)
    b.fingerprint["lin"] = [10, 14]
    with pytest.raises(LoraError, match="different base models: module 'lin' has weight shape"):
        combine([(a, 1.0), (b, 1.0)])
    b = make({"lin": (2, 2)}, 1)
    b.modules["lin"].A = torch.randn(2, 14)
    b.fingerprint = {}
    with pytest.raises(LoraError, match="module 'lin' has factors .* different bases"):
        combine([(a, 1.0), (b, 1.0)])


def test_different_kinds_for_one_module_are_refused():
    a = make({"lin": (2, 2)}, 0)
    b = make({"lin": (2, 2)}, 1)
    b.modules["lin"].kind = "embedding"  # same factor shapes, different meaning
    with pytest.raises(LoraError, match="'lin' is a linear adapter .* but a embedding"):
        combine([(a, 1.0), (b, 1.0)], "svd")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_inputs_are_refused(bad):
    a = make({"lin": (2, 2)}, 0)
    b = make({"lin": (2, 2)}, 1)
    b.modules["lin"].B[0, 0] = bad
    with pytest.raises(LoraError, match="input 2: module 'lin' factor B contains NaN or Inf"):
        combine([(a, 1.0), (b, 1.0)])
    with pytest.raises(LoraError, match="not a finite number"):
        combine([(a, bad)])


def test_linear_with_unequal_ranks_and_ties_without_density_are_refused():
    inputs = [(make({"lin": (2, 2)}, 0), 1.0), (make({"lin": (3, 3)}, 1), 1.0)]
    with pytest.raises(LoraError, match="linear.*equal ranks.*'lin'"):
        combine(inputs, "linear")
    for method in ("ties", "dare", "ties-svd", "dare-svd"):
        with pytest.raises(LoraError, match="density"):
            combine(inputs, method)
    with pytest.raises(LoraError, match="unknown method"):
        combine(inputs, "mean")
    with pytest.raises(LoraError, match="keeps the inputs' ranks"):
        combine(inputs, "cat", rank=2)


# --- resize ------------------------------------------------------------------------------------------------------
def test_resize_to_rank_at_least_r_returns_the_module_exactly():
    a = make({"lin": (3, 6), "conv3": (2, 1), "emb": (4, 4)}, 0)
    out, report = resize(a, rank=4)
    for path, m in a.modules.items():
        n = out.modules[path]
        assert torch.equal(n.A, m.A) and torch.equal(n.B, m.B) and n.alpha == m.alpha
    assert report.energy == pytest.approx(1.0)


@pytest.mark.parametrize("rslora", [False, True])
def test_resize_keeps_the_scale_and_is_the_best_rank_k(rslora):
    a = make({"lin": (6, 12), "lin2": (5, 2), "conv3": (6, 3), "emb": (5, 7)}, 0, rslora=rslora)
    k = 2
    out, report = resize(a, rank=k)
    assert out.use_rslora == rslora
    before, after = deltas(a), deltas(out)
    kept = total = 0.0
    for path, m in a.modules.items():
        n = out.modules[path]
        assert n.r == k
        assert scale(n.r, n.alpha, rslora) == pytest.approx(scale(m.r, m.alpha, rslora))  # alpha/r (or /√r) kept
        U, S, Vh = torch.linalg.svd(before[path], full_matrices=False)
        assert rel(after[path], U[:, :k] * S[:k] @ Vh[:k]) <= 1e-5, path
        e = S.pow(2)
        share = float(e[:k].sum() / e.sum())
        mod = report.modules[path]
        assert mod["kept"] / mod["total"] == pytest.approx(share, rel=1e-6)
        kept, total = kept + float(e[:k].sum()), total + float(e.sum())
    assert report.energy == pytest.approx(kept / total, rel=1e-6)
    assert report.energy < 0.99


def test_resize_needs_a_rank_or_rule():
    with pytest.raises(LoraError, match="--rank"):
        resize(make({"lin": (2, 2)}, 0))


# --- extract -----------------------------------------------------------------------------------------------------
class ExtractNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 10)
        self.c1d = Conv1D(10, 10)  # GPT-2's Conv1D: weight stored in x out
        self.norm = nn.LayerNorm(10)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.norm(self.c1d(torch.tanh(self.lin(self.emb(ids)))))  # (b, t, 10)
        return self.head(self.conv(h.unsqueeze(1)).mean((2, 3)))


def rank_k_change(module: nn.Module, k: int, g: torch.Generator) -> torch.Tensor:
    """Add a rank-k change to the module's weight; returns it in canonical orientation (out x in·k)."""
    w = module.weight
    if isinstance(module, (nn.Embedding, Conv1D)):
        out, inp = w.shape[1], w.shape[0]
    else:
        out, inp = w.shape[0], w[0].numel()
    D = (torch.randn(out, k, generator=g) @ torch.randn(k, inp, generator=g)) * 0.1
    with torch.no_grad():
        w.add_(D.T if isinstance(module, (nn.Embedding, Conv1D)) else D.reshape(w.shape))
    return D.double()


def test_extract_gives_back_a_rank_k_change_exactly():
    torch.manual_seed(0)
    base = ExtractNet().eval()
    tuned = copy.deepcopy(base)
    g, k = torch.Generator().manual_seed(1), 2
    changes = {name: rank_k_change(getattr(tuned, name), k, g) for name in ("emb", "lin", "c1d", "conv")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only adaptable weights changed: no warning
        a, report = extract(base, tuned, rank=k)
    assert set(a.modules) == set(changes)  # head did not change, so it is not in the adapter
    got = deltas(a)
    for name, D in changes.items():
        assert a.modules[name].r == k and a.modules[name].kind == lorakit.core.layers.kind_of(getattr(base, name))
        torch.testing.assert_close(got[name], D, atol=1e-5, rtol=1e-5)
    assert report.energy == pytest.approx(1.0)

    model = copy.deepcopy(base)
    apply(model, a, "extracted")
    ids = torch.randint(0, 20, (2, 5), generator=g)
    with torch.no_grad():
        assert not torch.allclose(base(ids), tuned(ids), atol=1e-3)
        torch.testing.assert_close(model(ids), tuned(ids), atol=1e-5, rtol=1e-5)


def test_extract_warns_about_changes_a_lora_cannot_hold_and_refuses_identical_models():
    torch.manual_seed(0)
    base = ExtractNet().eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    rank_k_change(tuned.lin, 1, g)
    rank_k_change(tuned.c1d, 1, g)
    with torch.no_grad():
        tuned.norm.weight.add_(0.5)
    with pytest.warns(UserWarning, match=r"norm\.weight"):
        a, _ = extract(base, tuned, rank=1)
    assert set(a.modules) == {"lin", "c1d"}
    with pytest.warns(UserWarning, match=r"c1d\.weight"):  # changed but not targeted
        a, _ = extract(base, tuned, rank=1, targets=["lin"])
    assert set(a.modules) == {"lin"}
    with pytest.raises(LoraError, match="identical"):
        extract(base, copy.deepcopy(base), rank=2)


# --- the guard ---------------------------------------------------------------------------------------------------
def part(B: torch.Tensor, A: torch.Tensor, s: float = 1.0, w: float = 1.0) -> Part:
    return Part(A.double(), B.double(), s, w)


def rand_part(g, out=10, inp=12, r=3, s=0.5, w=1.0) -> Part:
    return part(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g), s, w)


@pytest.mark.parametrize("method", ["spectral", "shared", "norm"])
def test_guard_leaves_one_input_unchanged(method):
    p = rand_part(torch.Generator().manual_seed(0), w=-0.7)
    assert torch.allclose(guard([p], method).delta(), p.delta(), atol=1e-12)


def test_shared_guard_counts_a_shared_update_once():
    p = rand_part(torch.Generator().manual_seed(0))
    q = part(p.Braw.clone(), p.A.clone(), p.s, p.w)
    got = guard([p, q], "shared").delta()
    assert rel(got, p.delta()) <= 1e-9
    assert rel(p.delta() + q.delta(), p.delta()) > 0.9  # the plain stack doubles it


def test_shared_guard_passes_orthogonal_inputs_unchanged():
    g = torch.Generator().manual_seed(0)
    U, V, r = orthonormal(10, 6, g), orthonormal(12, 6, g), 3
    p = part(U[:, :r] @ torch.randn(r, r, generator=g, dtype=F64), torch.randn(r, r, generator=g, dtype=F64) @ V[:, :r].T)
    q = part(U[:, r:] @ torch.randn(r, r, generator=g, dtype=F64), torch.randn(r, r, generator=g, dtype=F64) @ V[:, r:].T,
             w=-0.8)
    want = p.delta() + q.delta()
    assert rel(guard([p, q], "shared").delta(), want) <= 1e-9
    # only the column spaces orthogonal (rows shared) is not enough to pass unchanged
    q2 = part(U[:, r:] @ torch.randn(r, r, generator=g, dtype=F64), torch.randn(r, r, generator=g, dtype=F64) @ V[:, :r].T)
    assert rel(guard([p, q2], "shared").delta(), p.delta() + q2.delta()) > 1e-3


def test_spectral_guard_caps_sigma_max_at_the_larger_inputs():
    g = torch.Generator().manual_seed(0)
    p, q = rand_part(g), rand_part(g, s=0.3)
    q = part(p.Braw + 0.3 * q.Braw, p.A + 0.3 * q.A, 0.4)  # mostly the same directions: the sum overshoots
    sums = torch.linalg.svdvals(p.delta() + q.delta())
    cap = max(float(torch.linalg.svdvals(x.delta())[0]) for x in (p, q))
    assert float(sums[0]) > cap * 1.2
    got = torch.linalg.svdvals(guard([p, q], "spectral").delta())
    assert float(got[0]) == pytest.approx(cap, rel=1e-9)
    torch.testing.assert_close(got, sums.clamp(max=cap), atol=1e-9, rtol=1e-9)


def test_norm_guard_caps_the_frobenius_norm():
    g = torch.Generator().manual_seed(0)
    p = rand_part(g)
    q = part(p.Braw * 1.1, p.A, 0.4)
    total = p.delta() + q.delta()
    cap = max(float(x.delta().norm()) for x in (p, q))
    got = guard([p, q], "norm").delta()
    assert float(total.norm()) > cap
    assert float(got.norm()) == pytest.approx(cap, rel=1e-9)
    assert rel(got, total * (cap / float(total.norm()))) <= 1e-9  # scaled, not turned


def test_combine_with_the_shared_guard_counts_a_duplicate_once():
    a = make({"lin": (3, 6), "conv3": (2, 2)}, 0)
    out = combine([(a, 1.0), (copy.deepcopy(a), 1.0)], "cat", guard_method="shared")
    want = deltas(a)
    for path, d in deltas(out).items():
        assert rel(d, want[path]) <= 1e-6
    assert out.history["guard"] == "shared"


# --- the command line --------------------------------------------------------------------------------------------
def files(tmp_path, *adapters: Adapter) -> list[Path]:
    return [lorakit.formats.io.write(a, tmp_path / f"in{i}.safetensors") for i, a in enumerate(adapters)]


def run(argv, capsys) -> tuple[int, str, str]:
    from lorakit.cli import main

    code = main([str(x) for x in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_combine_writes_the_exact_sum_and_records_how(tmp_path, capsys):
    a, b = make({"lin": (2, 4), "conv3": (2, 2)}, 0), make({"lin": (3, 1), "emb": (2, 2)}, 1, rslora=True)
    fa, fb = files(tmp_path, a, b)
    code, out, _ = run(["combine", f"{fa}:0.7", f"{fb}:-0.4", "--method", "cat", "--out", tmp_path / "c.safetensors"],
                       capsys)
    assert code == 0 and "c.safetensors" in out
    c, fmt = lorakit.read(tmp_path / "c.safetensors")
    want = exact([(a, 0.7), (b, -0.4)])
    assert fmt == "lorakit" and set(c.modules) == set(want)
    for path, d in deltas(c).items():
        assert rel(d, want[path]) <= 1e-6
    assert c.history["method"] == "cat"
    assert [(i["source"], i["weight"]) for i in c.history["inputs"]] == [(str(fa), 0.7), (str(fb), -0.4)]

    code, _, _ = run(["combine", fa, fb, "--method", "svd", "--rank", "1", "--format", "peft", "--out", tmp_path / "p"],
                     capsys)
    p, fmt = lorakit.read(tmp_path / "p")
    assert code == 0 and fmt == "peft" and {m.r for m in p.modules.values()} == {1}
    lib = deltas(combine([(a, 1.0), (b, 1.0)], "svd", rank=1))
    for path, d in deltas(p).items():
        assert rel(d, lib[path]) <= 1e-6


def test_cli_combine_that_fails_writes_nothing(tmp_path, capsys):
    a, b = make({"lin": (2, 2)}, 0), make({"lin": (3, 3)}, 1)
    other = make({"lin": (2, 2)}, 2)
    other.fingerprint["lin"] = [10, 14]
    nan = make({"lin": (2, 2)}, 3)
    nan.modules["lin"].A[0, 0] = float("nan")
    fa, fb, fo, fn = files(tmp_path, a, b, other, nan)
    before = sorted(tmp_path.iterdir())
    for extra, message in [([fb, "--method", "linear"], "equal ranks"), ([fb, "--method", "ties"], "--density"),
                           ([fo], "different base models: module 'lin'"), ([fn], "NaN or Inf"),
                           ([fb, "--method", "cat", "--rank", "2"], "keeps the inputs' ranks")]:
        for out in (tmp_path / "c.safetensors", tmp_path / "peftdir"):
            fmt = ["--format", "peft"] if out.suffix != ".safetensors" else []
            code, _, err = run(["combine", fa, *extra, *fmt, "--out", out], capsys)
            assert code == 2 and message in err, (extra, err)
            assert sorted(tmp_path.iterdir()) == before  # no output, no temp file left behind


def test_cli_resize_prints_the_energy_and_keeps_the_scale(tmp_path, capsys):
    a = make({"lin": (6, 12), "emb": (5, 2)}, 0)
    (fa,) = files(tmp_path, a)
    code, out, _ = run(["resize", fa, "--rank", "2", "--out", tmp_path / "r.safetensors"], capsys)
    assert code == 0
    r, _ = lorakit.read(tmp_path / "r.safetensors")
    _, report = resize(a, rank=2)
    assert f"overall energy kept: {100 * report.energy:.4f}%" in out
    for path, m in r.modules.items():
        assert m.r == 2 and scale(m.r, m.alpha, False) == pytest.approx(scale(a.modules[path].r, a.modules[path].alpha, False))
    assert r.history["method"] == "resize" and r.history["rank"] == 2
    code, out, _ = run(["resize", fa, "--dynamic", "energy=0.5", "--out", tmp_path / "d.safetensors"], capsys)
    assert code == 0 and {m.r for m in lorakit.read(tmp_path / "d.safetensors")[0].modules.values()} < {1, 2, 3, 4, 5}
    code, _, err = run(["resize", fa, "--out", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "--rank" in err and not (tmp_path / "x.safetensors").exists()


def test_cli_extract_of_identical_models_fails_and_writes_nothing(tmp_path, save_tiny, capsys):
    folder = save_tiny(tmp_path / "base")
    code, _, err = run(["extract", "--base", folder, "--tuned", folder, "--rank", "2", "--out", tmp_path / "x.safetensors"],
                       capsys)
    assert code == 2 and "identical" in err and not (tmp_path / "x.safetensors").exists()
