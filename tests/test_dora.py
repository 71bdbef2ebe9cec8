"""DoRA (weight-decomposed LoRA) against the real peft package: PEFT adapters load with PEFT's outputs, lorakit
adapters load in PEFT with lorakit's, gradients match (the norm is detached), merge/unmerge are exact, weighted
stacks add each adapter's change of the weight, and LyCORIS/kohya `dora_scale` files read."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorakit  # noqa: E402
from lorakit.core.layers import use_fast  # noqa: E402
from test_peft_interop import INPUT_IDS, logits, tiny  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")]
TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def perturb_magnitudes(model, key="magnitude"):
    """Move every DoRA magnitude off its initial norm (else m/‖W+ΔW‖ = 1 and the magnitude is not tested)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if key in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_dora_adapter_loads_with_peft_outputs(arch, tmp_path):
    pm = peft.get_peft_model(tiny(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                                         init_lora_weights=False, use_dora=True))
    perturb_magnitudes(pm, "lora_magnitude_vector")
    pm.save_pretrained(tmp_path / "peft")
    want = logits(pm.eval())
    model = tiny(arch)
    lorakit.load(model, tmp_path / "peft")
    assert torch.allclose(logits(model), want, **TOL)
    assert not torch.allclose(logits(tiny(arch)), want, **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lorakit_dora_exports_load_in_peft(arch, tmp_path):
    model = lorakit.inject(tiny(arch), lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS[arch], init=False,
                                                          use_dora=True))
    perturb_magnitudes(model)
    want = logits(model)
    lorakit.save(model, tmp_path / "peft", format="peft")
    pm = peft.PeftModel.from_pretrained(tiny(arch), tmp_path / "peft").eval()
    assert torch.allclose(logits(pm), want, **TOL)
    lorakit.save(model, tmp_path / "a.safetensors")  # and lorakit's own file
    again = tiny(arch)
    lorakit.load(again, tmp_path / "a.safetensors")
    assert torch.equal(logits(again), want)


def test_conv_dora_matches_peft_both_ways(tmp_path):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pm = peft.get_peft_model(Convs(), peft.LoraConfig(r=2, target_modules=["conv", "lin"], init_lora_weights=False,
                                                      use_dora=True))
    perturb_magnitudes(pm, "lora_magnitude_vector")
    pm.save_pretrained(tmp_path / "peft")
    model = Convs()
    lorakit.load(model, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(model(x), pm(x), **TOL)
    lorakit.save(model, tmp_path / "back", format="peft")
    back = peft.PeftModel.from_pretrained(Convs(), tmp_path / "back")
    with torch.no_grad():
        assert torch.allclose(back(x), pm(x), **TOL)


@pytest.mark.parametrize("fast", [True, False])
def test_gradients_equal_peft_with_the_norm_detached(fast, tmp_path):
    """One backward: A, B and the magnitude get PEFT's gradients (so the norm is detached exactly as there)."""
    pm = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False, use_dora=True))
    perturb_magnitudes(pm, "lora_magnitude_vector")
    model = tiny("llama")
    pm.save_pretrained(tmp_path)
    lorakit.load(model, tmp_path, name="default")
    use_fast(fast)
    try:
        model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    finally:
        use_fast(True)
    pm(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    theirs = {n.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight").replace(
        "lora_magnitude_vector", "lora_magnitude"): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs) and any("lora_magnitude" in n for n in mine)
    for n in mine:
        assert torch.allclose(mine[n], theirs[n], atol=1e-6, rtol=1e-4), n


def test_merge_and_unmerge_are_exact():
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init=False,
                                                             use_dora=True))
    perturb_magnitudes(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = logits(model)
    lorakit.merge(model)
    assert torch.allclose(logits(model), want, **TOL)
    lorakit.unmerge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    plain = lorakit.unload(model, merge=True)
    assert torch.allclose(logits(plain), want, **TOL)


def test_weighted_stacks_add_each_adapters_change_of_the_weight():
    """W + Σ wᵢ·(gᵢ⊙(W + sᵢBᵢAᵢ) − W), negative weights and a plain LoRA adapter in the stack included."""
    model = tiny("llama")
    for name, dora in (("a", True), ("b", True), ("c", False)):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj"], init=False, use_dora=dora), name)
    perturb_magnitudes(model)
    weights = {"a": 0.7, "b": -0.4, "c": 1.3}
    lorakit.set_weights(model, weights)
    got = logits(model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if hasattr(m, "lora_magnitude") and m.lora_weights:
                total = m.weight.clone()
                for n, w in weights.items():
                    V = m.weight + m.lora_scale[n] * m.lora_B[n] @ m.lora_A[n]
                    g = m.lora_magnitude[n][:, None] / V.norm(dim=1, keepdim=True) if n in m.lora_magnitude else 1
                    total += w * (g * V - m.weight)
                m.weight.copy_(total)
                m.disabled = True
    assert torch.allclose(got, logits(ref), **TOL)
    # (PEFT, with two DoRA adapters active, rescales the running output: the second adapter's "base result" holds
    # the first's update in eval but not under dropout, so its stack depends on order and mode. Not followed.)


def test_refusals_leave_the_model_as_it_was():
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(targets=["q_proj"], use_dora=True), "a")
    lorakit.inject(model, lorakit.LoraConfig(targets=["q_proj"], use_dora=True), "b")
    with pytest.raises(lorakit.LoraError, match="DoRA"):
        lorakit.set_weights(model, ["a", "b"], guard="spectral")
    with pytest.raises(lorakit.LoraError, match="DoRA"):
        lorakit.set_rows(model, ["a", "b"])
    with pytest.raises(lorakit.LoraError, match="DoRA"):
        lorakit.prepare_hotswap(model, 8)
    with pytest.raises(lorakit.LoraError, match="DoRA is not supported on an embedding"):
        lorakit.inject(tiny("llama"), lorakit.LoraConfig(targets=["embed_tokens"], use_dora=True))
    assert lorakit.active(model) == {"b": 1.0}


def test_operations_on_bc_products_refuse_dora_rather_than_drop_the_magnitude(tmp_path):
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(targets=["q_proj"], use_dora=True))
    lorakit.save(model, tmp_path / "d.safetensors")
    a, _ = lorakit.read(tmp_path / "d.safetensors")
    for call in (lambda: lorakit.combine([(a, 1.0)]), lambda: lorakit.resize(a, 2),
                 lambda: lorakit.save(model, tmp_path / "x", format="diffusers")):
        with pytest.raises(lorakit.LoraError, match="is DoRA: .* would drop its magnitude"):
            call()


def test_dora_trains_the_magnitude_and_counts_it():
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], use_dora=True))
    s = lorakit.summary(model)
    hidden, layers = 32, 2
    kv = 16  # v_proj's output: 2 kv heads x 8
    assert s.adapters["default"]["params"] == layers * (4 * hidden * 2 + 4 * kv + 4 * hidden + hidden + kv)
    assert s.trainable == s.adapters["default"]["params"]
    assert torch.equal(logits(model), logits(tiny("llama")))  # identity at init: m = ‖W‖, B = 0


@pytest.mark.parametrize("axis", ["in", "out"])
def test_lycoris_dora_scale_files_read(tiny_sd, tmp_path, axis):
    """A kohya/LyCORIS file with `dora_scale` (1, in) or (out, 1) gives the UNet the weight the real LyCORIS
    computes (lycoris.functional.general.weight_decompose of W + s·up·down, multiplier 1); it writes back to kohya
    with the same magnitudes."""
    lycoris = pytest.importorskip("lycoris.functional.general")
    from test_kohya import ATTN, unet_out

    unet = tiny_sd.unet
    name, path = f"lora_unet_{ATTN}_attn1_to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    W = unet.get_submodule(path).weight.detach().clone()
    down, up = torch.randn(4, W.shape[1], generator=g) * 0.3, torch.randn(W.shape[0], 4, generator=g) * 0.3
    V = W + (2.0 / 4) * up @ down
    norm = V.norm(dim=0, keepdim=True) if axis == "in" else V.norm(dim=1, keepdim=True)
    scale = norm * (1 + 0.3 * torch.rand(norm.shape, generator=g))
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0),
               f"{name}.dora_scale": scale}, tmp_path / "dora.safetensors")
    want_unet = copy.deepcopy(unet)
    with torch.no_grad():
        want_unet.get_submodule(path).weight.copy_(lycoris.weight_decompose(V.clone(), scale, 1, axis == "out"))
    lorakit.load(unet, tmp_path / "dora.safetensors")
    assert torch.allclose(unet_out(unet), unet_out(want_unet), atol=1e-5, rtol=1e-5)
    lorakit.save(unet, tmp_path / "back.safetensors", format="kohya")
    back, _ = lorakit.read(tmp_path / "back.safetensors")
    (ml,) = back.modules.values()
    assert ml.dora_axis == axis and torch.equal(ml.magnitude, scale.reshape(-1))
    if axis == "in":
        with pytest.raises(lorakit.LoraError, match="per input channel"):
            lorakit.save(unet, tmp_path / "peft", format="peft")


def test_inference_keeps_the_gain_until_something_it_depends_on_changes():
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, targets=["q_proj"], init=False, use_dora=True))
    first = logits(model)
    assert torch.equal(logits(model), first)
    q = model.model.layers[0].self_attn.q_proj
    assert "default" in q.lora_gain_cache
    with torch.no_grad():
        q.lora_B["default"].mul_(2)  # in place: the cached g must not be reused
    fresh = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, targets=["q_proj"], init=False, use_dora=True))
    fresh.load_state_dict(model.state_dict())
    fresh.model.layers[0].self_attn.q_proj.lora_gain_cache.clear()
    assert torch.equal(logits(model), logits(fresh)) and not torch.equal(logits(model), first)


def test_dora_on_a_quantized_base_merges_into_dequantized_weights():
    pytest.importorskip("torchao")
    from lorakit.core.quant import quantize

    model = lorakit.inject(quantize(tiny("llama"), "int8"), lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"],
                                                                              init=False, use_dora=True))
    perturb_magnitudes(model)
    model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_magnitude" in n)
    want = logits(model)
    lorakit.merge(model)
    assert torch.allclose(logits(model), want, atol=1e-4, rtol=1e-4)
