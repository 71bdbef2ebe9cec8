"""QLoRA: LoRA on a frozen base quantized by torchao (4-bit NF4, int8) trains, merges, unmerges, saves and loads
onto the fp32 base; `lorakit train --quantize` end to end."""

import json
import sys

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraError
from lorakit.core.layers import dense, is_quantized
from lorakit.core.quant import quantize

pytest.importorskip("torchao")

TOL = {"nf4": 0.15, "int8": 0.02}  # max |logit difference| from fp32 over max |logit| (measured 0.10 and 0.007)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_base_is_close_to_fp32_and_keeps_shapes(mode):
    ref, model = tiny(), quantize(tiny(), mode)
    layer = model.model.layers[0].self_attn.k_proj
    assert is_quantized(layer.weight) and layer.weight.shape == (32, 64) and layer.weight.dtype == torch.float32
    assert not is_quantized(model.lm_head.weight) and not is_quantized(model.model.embed_tokens.weight)
    assert type(dense(layer.weight)) is torch.Tensor and dense(layer.weight).shape == (32, 64)
    want, got = logits(ref, IDS), logits(model, IDS)
    assert (got - want).abs().max() <= TOL[mode] * want.abs().max()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_lora_on_a_quantized_base_trains_merges_unmerges_and_loads_on_fp32(mode, tmp_path):
    model = lorakit.inject(quantize(tiny(), mode), lorakit.LoraConfig(r=4, alpha=8, targets=LINEARS, init=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_A" in n or "lora_B" in n for n in grads)
    q_proj = model.model.layers[1].self_attn.q_proj
    assert q_proj.weight.grad is None and not q_proj.weight.requires_grad

    model.eval()
    unmerged, quantized = logits(model, IDS), q_proj.weight
    lorakit.merge(model)
    assert type(q_proj.weight) is nn.Parameter and (logits(model, IDS) - unmerged).abs().max() < 1e-5  # measured 1e-6
    lorakit.unmerge(model)
    assert q_proj.weight is quantized and torch.equal(logits(model, IDS), unmerged)

    lorakit.save(model, tmp_path / "a.safetensors", base_model="tiny")
    fp32 = tiny()
    lorakit.load(fp32, tmp_path / "a.safetensors")
    tuned = logits(fp32, IDS)  # the same factors on the fp32 base: as close to the quantized run as the bases are
    assert (tuned - unmerged).abs().max() <= TOL[mode] * unmerged.abs().max()
    assert (tuned - logits(tiny(), IDS)).abs().max() > 1e-3  # and the adapter did load


def test_bad_mode_missing_torchao_and_full_finetune_are_refused(monkeypatch):
    with pytest.raises(LoraError, match="unknown quantization 'nf2'; choose one of nf4, int8"):
        quantize(tiny(), "nf2")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torchao.quantization", None)
        with pytest.raises(LoraError, match=r"needs torchao .* pip install 'lorakit\[quant\]'"):
            quantize(tiny(), "int8")
    from lorakit.llm.train import TrainConfig
    from lorakit.options import build

    with pytest.raises(LoraError, match="--quantize .* --full-finetune"):
        build(TrainConfig, {"quantize": "nf4", "full_finetune": True})


def test_train_with_quantize_nf4_end_to_end(tmp_path, save_tiny):
    from lorakit.cli import main

    save_tiny(tmp_path / "m")
    lines = [{"text": " ".join("abc"[(i + k) % 3] for k in range(9))} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["train", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "train.jsonl"), "--out",
                 str(tmp_path / "run"), "--quantize", "nf4", "--targets", "all-linear", "--r", "4", "--lr", "1e-2",
                 "--max-steps", "12", "--batch-size", "4"]) == 0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.1
    base = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    lorakit.load(base, tmp_path / "run" / "adapter.safetensors")  # an ordinary adapter on the fp32 base


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_layers_take_the_fused_path_and_keep_w_packed(mode):
    """The fused path equals the reference path on a quantized base (outputs and gradients) and keeps no float copy
    of W for backward (torchao's int8 linear does)."""
    from test_fast_paths import saved_bytes

    from lorakit.core import layers

    layer = nn.Sequential(nn.Linear(256, 256))
    quantize(layer, mode)
    lorakit.inject(layer, lorakit.LoraConfig(r=8, targets=["0"], init=False))
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0), requires_grad=True)
    runs = {}
    for fast in (True, False):
        layers.use_fast(fast)
        try:
            kept, y = saved_bytes(lambda: layer(x))
            y.square().sum().backward()
        finally:
            layers.use_fast(True)
        runs[fast] = kept, y.detach(), x.grad.clone(), layer[0].lora_B["default"].grad.clone()
        x.grad = layer[0].lora_B["default"].grad = layer[0].lora_A["default"].grad = None
    for a, b in zip(runs[True][1:], runs[False][1:]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert runs[True][0] < 256 * 256 * 4  # less than W in fp32: x (64 KiB) and the rank-8 products only
