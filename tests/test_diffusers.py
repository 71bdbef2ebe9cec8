"""diffusers LoRA files: lorakit writes what `pipe.load_lora_weights` loads, reads every diffusers layout, and puts
LoRA onto a whole pipeline or a lone UNet / text encoder straight from the file."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lorakit
from lorakit import LoraConfig, LoraError
from lorakit.formats import diffusers as dfmt

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "down_blocks.1.resnets.0.conv1", "q_proj", "v_proj"]


def randomize(model):
    """Give every LoRA factor random values (B starts at zero, which would hide mistakes)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_A." in n or ".lora_B." in n or n.endswith(("lora_A.default", "lora_B.default")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def outputs(pipe):
    """UNet and text-encoder outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    ids = torch.tensor([[53, 3, 7, 54]])
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=ctx).sample, pipe.text_encoder(ids)[0]


def adapted(pipe):
    """The pipeline with a lorakit adapter: mixed ranks and alphas, conv modules and the text encoder."""
    lorakit.inject(pipe, LoraConfig(r=4, alpha=4, targets=TARGETS, rank_pattern={"to_v": 2},
                                    alpha_pattern={"attn2.to_k": 3, "q_proj": 6, "conv1": 2.5}))
    randomize(pipe.unet)
    randomize(pipe.text_encoder)
    return pipe


def test_a_lorakit_file_loads_in_diffusers_with_the_same_outputs(tiny_sd, tmp_path):
    base = copy.deepcopy(tiny_sd)
    pipe = adapted(tiny_sd)
    path = lorakit.save(pipe, tmp_path / "out", format="diffusers")
    assert path.name == dfmt.WEIGHTS_NAME
    base.load_lora_weights(str(tmp_path / "out"))
    for ours, theirs in zip(outputs(pipe), outputs(base)):
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    config = json.loads(meta["lora_adapter_metadata"])
    alphas = {k: config["text_encoder.alpha_pattern"].get(k, config["text_encoder.lora_alpha"])
              for k in (r"encoder\.layers\.1\.self_attn\.q_proj", r"encoder\.layers\.1\.self_attn\.v_proj")}
    assert sorted(alphas.values()) == [4, 6]


def test_round_trip_through_diffusers_is_bit_exact(tiny_sd, tmp_path):
    pipe = adapted(tiny_sd)
    lorakit.save(pipe, tmp_path / "a.safetensors", format="diffusers")
    back, fmt = lorakit.read(tmp_path / "a.safetensors")
    ours = lorakit.formats.adapter.from_model(lorakit.core.components.as_module(pipe), "default")
    assert fmt == "diffusers" and set(back.modules) == set(ours.modules)
    for path, m in ours.modules.items():
        b = back.modules[path]
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B) and b.alpha == m.alpha, path
    fresh = copy.deepcopy(pipe)
    lorakit.unload(fresh, merge=False)
    lorakit.load(fresh, tmp_path / "a.safetensors")
    for x, y in zip(outputs(fresh), outputs(pipe)):
        assert torch.equal(x, y)


def test_lone_unet_and_text_encoder_take_their_part_of_a_pipeline_file(tiny_sd, tmp_path):
    base = copy.deepcopy(tiny_sd)
    pipe = adapted(tiny_sd)
    lorakit.save(pipe, tmp_path / "a.safetensors", format="diffusers")
    with pytest.warns(UserWarning, match="only its unet part"):
        lorakit.load(base.unet, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match="only its text_encoder part"):
        lorakit.load(base.text_encoder, tmp_path / "a.safetensors")
    for x, y in zip(outputs(base), outputs(pipe)):
        assert torch.equal(x, y)
    # and a lone UNet's adapter is written under unet.
    lorakit.save(pipe.unet, tmp_path / "u.safetensors", format="diffusers")
    assert all(k.startswith("unet.") for k in safe_open(str(tmp_path / "u.safetensors"), "pt").keys())


def old_layout(pipe, text_model: bool) -> dict:
    """The adapter as diffusers' SD scripts saved it: lora.down/lora.up (UNet), lora_linear_layer (text encoder),
    optionally with the `text_model.` segment transformers 4 had, and no alphas."""
    sd = {}
    for path, m in lorakit.formats.adapter.from_model(lorakit.core.components.as_module(pipe), "default").modules.items():
        if path.startswith("unet."):
            sd[f"{path}.lora.down.weight"], sd[f"{path}.lora.up.weight"] = m.A, m.B
        else:
            path = path.replace("text_encoder.", "text_encoder.text_model.") if text_model else path
            sd[f"{path}.lora_linear_layer.down.weight"], sd[f"{path}.lora_linear_layer.up.weight"] = m.A, m.B
    return sd


@pytest.mark.parametrize("text_model", [False, True])
def test_old_layout_files_read_with_alpha_equal_to_rank_as_diffusers_does(tiny_sd, tmp_path, text_model):
    base, base2 = copy.deepcopy(tiny_sd), copy.deepcopy(tiny_sd)
    pipe = adapted(tiny_sd)
    save_file({k: v.contiguous() for k, v in old_layout(pipe, text_model).items()}, tmp_path / "old.safetensors")
    a, fmt = lorakit.read(tmp_path / "old.safetensors")
    assert fmt == "diffusers" and all(m.alpha == m.r for m in a.modules.values())
    lorakit.load(base, tmp_path / "old.safetensors")
    base2.load_lora_weights(str(tmp_path / "old.safetensors"))
    for x, y in zip(outputs(base), outputs(base2)):
        assert torch.allclose(x, y, atol=1e-5)


def test_attention_processor_layout_maps_to_out_lora_to_to_out_0(tiny_sd, tmp_path):
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    save_file({f"{attn}.processor.to_out_lora.down.weight": A, f"{attn}.processor.to_out_lora.up.weight": B},
              tmp_path / "p.safetensors")
    a, _ = lorakit.read(tmp_path / "p.safetensors")
    assert list(a.modules) == [f"{attn}.to_out.0"]
    before = tiny_sd.unet.get_submodule(f"{attn[5:]}.to_out.0").weight.detach().clone()
    lorakit.load(tiny_sd, tmp_path / "p.safetensors")
    lorakit.merge(tiny_sd)
    assert torch.allclose(tiny_sd.unet.get_submodule(f"{attn[5:]}.to_out.0").weight, before + B @ A, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    ({"unet.x.lora_A.weight": torch.ones(2, 4)}, "only its down/A"),
    ({"unet.x.lora_A.weight": torch.ones(2, 4), "unet.x.lora_B.weight": torch.ones(4, 3)}, "rank 2 but up/B of rank 3"),
    ({"unet.x.lora_A.weight": torch.ones(2, 4), "unet.x.lora_magnitude_vector": torch.ones(4)}, "DoRA"),
])
def test_malformed_diffusers_files_are_refused(tmp_path, bad, message):
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(LoraError, match=message):
        lorakit.read(tmp_path / "bad.safetensors")


def test_sd15_shaped_unet_default_targets_count(tmp_path):
    """The diffusers SD 1.x default (to_q/k/v/out.0 of every attention): 128 modules, 797,184 parameters at rank 4,
    a ~3.2 MB fp32 file."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # the SD 1.5 architecture
    lorakit.inject(unet, LoraConfig(r=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0"]))
    s = lorakit.summary(unet)
    assert (s.adapters["default"]["modules"], s.adapters["default"]["params"]) == (128, 797_184)
    a = lorakit.Adapter({f"unet.{p}": lorakit.ModuleLora(torch.zeros(m.lora_A["default"].shape),
                                                         torch.zeros(m.lora_B["default"].shape), 4)
                         for p, m in lorakit.core.model.lora_modules(unet).items()})
    path = lorakit.formats.io.write(a, tmp_path / "sd15.safetensors", format="diffusers")
    assert 3.2e6 < path.stat().st_size < 3.3e6
