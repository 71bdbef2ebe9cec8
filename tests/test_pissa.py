"""PiSSA and OLoRA initialisation: PEFT's starting factors and residual base; the model starts where the base was,
and what is saved is a plain LoRA that turns the untouched base into the trained model."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import lorakit  # noqa: E402
from test_peft_interop import logits, tiny  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def train_a_little(model):
    """Stand-in for training: move every factor (and magnitude) by a fixed random amount."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


# (not gpt2 with olora: PEFT's olora_init factors a Conv1D weight as stored, (in, out), not as W)
@pytest.mark.parametrize("arch, init", [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "olora")])
def test_starting_factors_and_residual_equal_peft(arch, init):
    cfg = lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS[arch], init=init)
    model = lorakit.inject(tiny(arch), cfg)
    pm = peft.get_peft_model(tiny(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                                         init_lora_weights=init, fan_in_fan_out=arch == "gpt2"))
    theirs = {n.replace("base_model.model.", "").replace(".default", "").replace(".base_layer", ""): p
              for n, p in pm.named_parameters()}
    mine = {n.replace(".default", ".weight") if ".lora_" in n else n: p for n, p in model.named_parameters()}
    assert mine.keys() == theirs.keys()
    for n in mine:  # singular vectors have a sign freedom: compare the products, and the residual weights
        if ".lora_A" in n:
            b = n.replace("lora_A", "lora_B")
            assert torch.allclose(mine[b] @ mine[n], theirs[b] @ theirs[n], atol=1e-5), n
        elif ".lora_B" not in n:
            assert torch.allclose(mine[n], theirs[n], atol=1e-6), n
    assert torch.allclose(logits(model), logits(tiny(arch)), atol=1e-5)  # the model starts at the base


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("dora", [False, True])
def test_saved_adapter_turns_the_untouched_base_into_the_trained_model(init, dora, tmp_path):
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"],
                                                             init=init, use_dora=dora))
    q = lambda m: m.model.layers[0].self_attn.q_proj.weight  # noqa: E731
    assert not torch.allclose(q(model), q(tiny("llama")), atol=1e-3)  # the base holds the residual
    train_a_little(model)
    want = logits(model)
    lorakit.save(model, tmp_path / "a.safetensors")
    base = tiny("llama")
    lorakit.load(base, tmp_path / "a.safetensors")
    assert torch.allclose(logits(base), want, **TOL)
    a, _ = lorakit.read(tmp_path / "a.safetensors")
    assert {m.r for m in a.modules.values()} == {8} and {m.alpha for m in a.modules.values()} == {16}
    lorakit.save(model, tmp_path / "peft", format="peft")  # and PEFT reads the converted adapter alike
    pm = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "peft").eval()
    assert torch.allclose(logits(pm), want, **TOL)


def test_rslora_keeps_its_scale_through_the_conversion(tmp_path):
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj"], init="pissa",
                                                             use_rslora=True))
    train_a_little(model)
    lorakit.save(model, tmp_path / "a.safetensors")
    base = tiny("llama")
    lorakit.load(base, tmp_path / "a.safetensors")
    assert torch.allclose(logits(base), logits(model), **TOL)


def test_delete_and_unload_give_the_base_back():
    before = logits(tiny("llama"))
    for finish in (lambda m: lorakit.delete(m, "default"), lambda m: lorakit.unload(m, merge=False)):
        model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, targets=["q_proj", "o_proj"], init="pissa"))
        train_a_little(model)
        finish(model)
        assert torch.allclose(logits(model), before, atol=1e-5)
    model = lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=4, targets=["q_proj", "o_proj"], init="olora"))
    train_a_little(model)
    want = logits(model)
    assert torch.allclose(logits(lorakit.unload(model, merge=True)), want, **TOL)


def test_bad_inits_are_refused():
    for bad in ("pissa_niter_0", "pissa_niter_x", "svd"):
        with pytest.raises(lorakit.LoraError, match="pissa_niter_K"):
            lorakit.LoraConfig(init=bad)
    model = tiny("llama")
    with pytest.raises(lorakit.LoraError, match="plain Linear or Conv1D"):
        lorakit.inject(model, lorakit.LoraConfig(targets=["q_proj", "lm_head", "embed_tokens"], init="pissa"))
    assert torch.equal(logits(model), logits(tiny("llama")))  # nothing was changed
