"""`lorakit train-sd` and `generate-image` on a tiny random SDXL pipeline (real diffusers classes): the conditioning
is the SDXL pipeline's (two encoders, pooled embedding, time ids from each image's crop), only LoRA factors train,
Dreambooth with prior preservation runs, the diffusers export loads in StableDiffusionXLPipeline.load_lora_weights
with lorakit's own outputs, and generate-image draws a grid."""

import json

import numpy as np
import pytest
import torch
from conftest import sd_workspace
from PIL import Image
from safetensors import safe_open

import lorakit
from lorakit import LoraError
from lorakit.options import build
from lorakit.sd import images as imagelib
from lorakit.sd.generate import generate
from lorakit.sd.pipeline import encode_prompts, load_pipeline
from lorakit.sd.train import SDTrainConfig, train_sd

H, W = 12, 10  # training images: resized to 10x8 at resolution 8, centre crop top 1, left 0


@pytest.fixture
def xl(tiny_sdxl, tmp_path):
    return sd_workspace(tiny_sdxl, tmp_path, H, W)


def config(tmp, **kw):
    base = dict(model=str(tmp / "pipe"), data=str(tmp / "images"), out=str(tmp / "run"), resolution=8, max_steps=3,
                lr=1e-2, seed=1, validation_prompts=[], num_validation_images=2, validation_steps=2)
    return build(SDTrainConfig, {**base, **kw})


def test_encode_prompts_conditions_as_the_sdxl_pipeline_does(tiny_sdxl):
    prompts = ["a dog", "b cat"]
    hidden, cond = encode_prompts(tiny_sdxl, prompts, [(12, 10, 1, 0), (8, 8, 0, 0)], 8)
    embeds, _, pooled, _ = tiny_sdxl.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert hidden.shape == (2, 16, 16 + 24) and torch.equal(hidden, embeds)  # penultimate states of both encoders
    extra = cond["added_cond_kwargs"]
    assert torch.equal(extra["text_embeds"], pooled)  # text_encoder_2's projected pooled output
    assert extra["time_ids"].tolist() == [[12, 10, 1, 0, 8, 8], [8, 8, 0, 0, 8, 8]]
    # without crops: an uncropped image at the pipeline's size, the time ids its own __call__ uses
    _, cond = encode_prompts(tiny_sdxl, ["a dog"])
    expect = tiny_sdxl._get_add_time_ids((8, 8), (0, 0), (8, 8), torch.float32, text_encoder_projection_dim=24)
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], expect)


def test_crops_are_reported_in_the_mirrored_image_when_flipped(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (10, 16, 3), dtype=np.uint8)).save(tmp_path / "w.png")
    x, crop = imagelib.load_cropped(tmp_path / "w.png", 8)  # resized to 13x8: centre crop left (13-8)//2 = 2
    xf, crop_f = imagelib.load_cropped(tmp_path / "w.png", 8, flip=True)
    assert crop == (10, 16, 0, 2) and crop_f == (10, 16, 0, 3) and torch.equal(xf, x.flip(-1))
    assert torch.equal(imagelib.load_image(tmp_path / "w.png", 8), x)


def test_text2image_trains_only_lora_factors_with_the_images_time_ids(xl, monkeypatch):
    import lorakit.sd.train as sdtrain

    seen = []

    def spy(unet, scheduler, latents, text, noise, t, snr_gamma, cond):
        seen.append((text.shape, {k: v.clone() for k, v in cond["added_cond_kwargs"].items()}))
        return real(unet, scheduler, latents, text, noise, t, snr_gamma, cond)

    real = sdtrain.denoising_loss
    monkeypatch.setattr(sdtrain, "denoising_loss", spy)
    train_sd(config(xl, batch_size=2, validation_prompts=["a dog"]))
    assert len(seen) == 3
    for shape, extra in seen:
        assert shape == (2, 16, 40) and extra["text_embeds"].shape == (2, 24)
        assert extra["time_ids"].tolist() == [[H, W, 1, 0, 8, 8]] * 2
    a, _ = lorakit.read(xl / "run" / "adapter.safetensors")
    # q,k,v,out of attn1 and attn2 in 8 transformer blocks (1 down, 2+2 up, 2 mid with transformer_layers (1, 2))
    assert len(a.modules) == 64 and all(p.startswith("unet.") for p in a.modules)
    assert all(m.B.abs().max() > 0 for m in a.modules.values())
    # the last sample grid came from the trained pipeline; the base plus the adapter draws it again, so nothing
    # but the LoRA factors changed
    fresh = load_pipeline(str(xl / "pipe"))
    lorakit.load(fresh, xl / "run" / "adapter.safetensors")
    captions = ["a dog"] * 2  # sample grids caption each cell with its prompt
    again = imagelib.grid(generate(fresh, ["a dog"], None, 2, 2, 7.5, 1, 8), 2, captions)
    grid = Image.open(xl / "run" / "samples" / "step-000003.png")
    assert grid.size == again.size and grid.size[0] == 2 * 128  # 8 px images shown at 128 px
    assert np.abs(np.asarray(grid, dtype=int) - np.asarray(again, dtype=int)).max() <= 1
    plain = imagelib.grid(generate(load_pipeline(str(xl / "pipe")), ["a dog"], None, 2, 2, 7.5, 1, 8), 2, captions)
    assert np.abs(np.asarray(grid, dtype=int) - np.asarray(plain, dtype=int)).max() > 1  # which the LoRA changed


def test_dreambooth_with_and_without_prior_preservation(xl):
    train_sd(config(xl, mode="dreambooth", instance_prompt="a photo of sks dog", out=str(xl / "plain"), max_steps=2))
    assert (xl / "plain" / "adapter.safetensors").exists()
    train_sd(config(xl, mode="dreambooth", instance_prompt="a photo of sks dog", prior_preservation=True,
                    class_prompt="a photo of a dog", class_data=str(xl / "class"), num_class_images=2,
                    prior_loss_weight=0.5, max_steps=2))
    assert len(list((xl / "class").glob("*.png"))) == 2  # drawn by the base SDXL pipeline
    metrics = [json.loads(x) for x in (xl / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:
        assert m["loss"] == pytest.approx(m["instance_loss"] + 0.5 * m["prior_loss"], rel=1e-5)


def outputs(pipe):
    """Both encoders' prompt embeddings, the pooled one, one UNet prediction and a 2-step image (fixed seeds)."""
    embeds, _, pooled, _ = pipe.encode_prompt("a dog", do_classifier_free_guidance=False)
    time_ids = torch.tensor([[8.0, 8, 0, 0, 8, 8]])
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = pipe.unet(x, 500, encoder_hidden_states=embeds,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    image = pipe("a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=8, width=8,
                 output_type="np").images
    return {"embeds": embeds, "pooled": pooled, "unet": eps, "image": torch.from_numpy(image)}


@pytest.mark.parametrize("text_encoder", [False, True])
def test_the_diffusers_export_loads_in_the_sdxl_pipeline_with_lorakits_outputs(xl, text_encoder):
    result = train_sd(config(xl, export=["diffusers"], text_encoder=True, text_lr=1e-2) if text_encoder
                      else config(xl, export=["diffusers"]))
    with safe_open(result["adapter_diffusers"], "pt") as f:
        comps = {k.split(".")[0] for k in f.keys()}
    assert comps == ({"unet", "text_encoder", "text_encoder_2"} if text_encoder else {"unet"})
    ours = load_pipeline(str(xl / "pipe"))
    lorakit.load(ours, xl / "run" / "adapter.safetensors")
    theirs = load_pipeline(str(xl / "pipe"))
    theirs.load_lora_weights(result["adapter_diffusers"])
    base = outputs(load_pipeline(str(xl / "pipe")))
    mine, diff = outputs(ours), outputs(theirs)
    for k in mine:
        assert (mine[k] - diff[k]).abs().max() < 1e-4, k
    changed = {k for k in mine if (mine[k] - base[k]).abs().max() > 1e-4}
    assert changed == ({"embeds", "pooled", "unet", "image"} if text_encoder else {"unet", "image"})


def test_generate_image_cli_draws_a_grid_with_sdxl_loras(xl, capsys):
    from lorakit.cli import main

    train_sd(config(xl, text_encoder=True, max_steps=2))
    adapter = str(xl / "run" / "adapter.safetensors")
    assert main(["generate-image", "--model", str(xl / "pipe"), "--lora", adapter + ":0.8", "--prompt", "a dog",
                 "--negative-prompt", "a cat", "--steps", "2", "--count", "4", "--size", "8",
                 "--out", str(xl / "grid.png")]) == 0
    assert Image.open(xl / "grid.png").size == (256, 256)  # 2 x 2 of 8 px images, each shown at 128 px
    # a prompt tag with its own text-encoder and UNet weights loads both text encoders' part as its own adapter
    (xl / "loras").mkdir()
    (xl / "loras" / "style.safetensors").write_bytes((xl / "run" / "adapter.safetensors").read_bytes())
    assert main(["generate-image", "--prompt", "a dog <lora:style:0.5:1>", "--lora-dir", str(xl / "loras"),
                 "--model", str(xl / "pipe"), "--steps", "2", "--count", "1", "--size", "8",
                 "--out", str(xl / "tag.png")]) == 0
    assert Image.open(xl / "tag.png").size == (128, 128)
    assert "wrote" in capsys.readouterr().out


def test_pivotal_is_refused_on_sdxl(xl):
    with pytest.raises(LoraError, match="pivotal tuning is not supported on SDXL"):
        train_sd(config(xl, mode="pivotal", instance_prompt="a photo of <s1>"))


def test_cached_latents_keep_each_images_crop_and_train_the_same_adapter(xl):
    kw = dict(random_flip=True, max_steps=2)
    train_sd(config(xl, out=str(xl / "plain"), **kw))
    train_sd(config(xl, out=str(xl / "cached"), cache_latents=True, **kw))
    a = lorakit.read(xl / "plain" / "adapter.safetensors")[0]
    b = lorakit.read(xl / "cached" / "adapter.safetensors")[0]
    assert all(torch.allclose(a.modules[p].B, b.modules[p].B, atol=1e-6) for p in a.modules)
