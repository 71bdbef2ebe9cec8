"""`lorakit train-sd` and `generate-image` on a tiny random Stable Diffusion pipeline: each mode trains only what
it should, prior preservation is wired in, pivotal tokens are saved and restored, resume equals an uninterrupted
run, prompt tags parse, and stacked LoRAs generate what their fused weights do."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_same_adapter, killed_at, launch_two, sd_workspace
from PIL import Image
from safetensors.torch import load_file

import lorakit
from lorakit import LoraError
from lorakit.options import build
from lorakit.sd.generate import load_pipeline, parse_tags
from lorakit.sd.pipeline import load_pipeline as load_base
from lorakit.sd.train import SDTrainConfig, train_sd


@pytest.fixture
def sd_setup(tiny_sd, tmp_path):
    return sd_workspace(tiny_sd, tmp_path)


def config(tmp, **kw):
    base = dict(model=str(tmp / "pipe"), data=str(tmp / "images"), out=str(tmp / "run"), resolution=8, max_steps=3,
                lr=1e-2, seed=1, validation_prompts=["a dog"], num_validation_images=2, validation_steps=2)
    return build(SDTrainConfig, {**base, **kw})


def weights(pipe):
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def test_text2image_trains_only_lora_and_writes_adapter_curve_grid_and_card(sd_setup):
    result = train_sd(config(sd_setup, export=["diffusers", "kohya"]))
    run = sd_setup / "run"
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    grid = Image.open(run / "samples" / "step-000003.png")  # 1 prompt x 2 images of 8 px, shown at 128 px, captioned
    assert grid.size[0] == 2 * 128 and grid.size[1] > 128
    front = yaml.safe_load((run / "README.md").read_text().split("---")[1])
    assert "base_model" not in front and front["mode"] == "text2image"  # a local folder is no hub id
    assert front["widget"] == [{"text": "a dog", "output": {"url": "samples/step-000003.png"}}]
    a, _ = lorakit.read(run / "adapter.safetensors")
    assert len(a.modules) == 4 * 2 * 6 and all(p.startswith("unet.") for p in a.modules)  # q,k,v,out x attn1,2 x 6 blocks
    assert any(m.B.abs().sum() > 0 for m in a.modules.values())
    assert lorakit.read(result["adapter_kohya"])[1] == "kohya"
    # the base weights are untouched: loading the adapter onto a fresh base reproduces the trained pipeline
    base = load_base(str(sd_setup / "pipe"))
    before = weights(base)
    lorakit.load(base, run / "adapter.safetensors")
    lorakit.unload(base, merge=False)
    assert all(torch.equal(v, weights(base)[k]) for k, v in before.items())


def test_only_lora_factors_train(sd_setup):
    from safetensors.torch import load_file

    train_sd(config(sd_setup, max_steps=3, save_every=2, validation_prompts=[], text_encoder=True))
    trained = load_file(str(sd_setup / "run" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    a, _ = lorakit.read(sd_setup / "run" / "adapter.safetensors")
    shapes = sorted(tuple(t.shape) for m in a.modules.values() for t in (m.A, m.B))
    assert sorted(tuple(t.shape) for t in trained.values()) == shapes  # the checkpoint holds the factors, nothing else


def test_cli_trains_from_yaml_and_generates_a_grid(sd_setup, capsys):
    from lorakit.cli import main

    (sd_setup / "run.yaml").write_text(yaml.safe_dump({
        "model": str(sd_setup / "pipe"), "data": str(sd_setup / "images"), "out": str(sd_setup / "run"),
        "resolution": 8, "max_steps": 2, "validation_prompts": []}))
    assert main(["train-sd", "--config", str(sd_setup / "run.yaml"), "--targets", "cross-attn"]) == 0
    assert main(["generate-image", "--lora", str(sd_setup / "run" / "adapter.safetensors") + ":-1", "--prompt",
                 "a dog", "--negative-prompt", "a cat", "--steps", "2", "--count", "4", "--size", "8", "--out",
                 str(sd_setup / "grid.png")]) == 0
    assert Image.open(sd_setup / "grid.png").size == (256, 256)
    assert main(["generate-image", "--prompt", "a <lora:nope:1> dog", "--lora-dir", str(sd_setup),
                 "--model", str(sd_setup / "pipe")]) == 2
    assert "no LoRA named 'nope'" in capsys.readouterr().err


def test_targets_cross_attn_conv_and_text_encoder(sd_setup):
    train_sd(config(sd_setup, targets="cross-attn+conv", text_encoder=True, max_steps=1, validation_prompts=[]))
    paths = list(lorakit.read(sd_setup / "run" / "adapter.safetensors")[0].modules)
    assert not any(".attn1." in p for p in paths) and any(p.endswith("attn2.to_k") for p in paths)
    assert any(p.endswith("resnets.0.conv1") for p in paths) and any(p.endswith("self_attn.out_proj") for p in paths)


def test_dreambooth_prior_preservation_generates_class_images_and_adds_their_loss(sd_setup):
    cfg = config(sd_setup, mode="dreambooth", instance_prompt="a photo of sks dog", prior_preservation=True,
                 class_prompt="a photo of a dog", class_data=str(sd_setup / "class"), num_class_images=3,
                 prior_loss_weight=0.5, validation_prompts=[])
    train_sd(cfg)
    assert len(list((sd_setup / "class").glob("*.png"))) == 3
    metrics = [json.loads(x) for x in (sd_setup / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["loss"] == pytest.approx(m["instance_loss"] + 0.5 * m["prior_loss"], rel=1e-5)


def test_pivotal_changes_only_the_new_token_rows_and_lora_and_restores_them(sd_setup):
    cfg = config(sd_setup, mode="pivotal", instance_prompt="a photo of <s1>", initializer_token="a", ti_steps=2,
                 max_steps=2, ti_lr=0.1, validation_prompts=[])
    train_sd(cfg)
    a, _ = lorakit.read(sd_setup / "run" / "adapter.safetensors")
    assert list(a.embeddings) == ["<s1>"]
    base = load_base(str(sd_setup / "pipe"))
    rows = base.text_encoder.get_input_embeddings().weight.detach().clone()
    init = base.tokenizer.encode("a", add_special_tokens=False)[0]
    assert not torch.equal(a.embeddings["<s1>"], rows[init])  # it moved from its initializer
    lorakit.load(base, sd_setup / "run" / "adapter.safetensors")
    new = base.tokenizer.convert_tokens_to_ids("<s1>")
    after = base.text_encoder.get_input_embeddings().weight
    assert torch.equal(after[new], a.embeddings["<s1>"])
    assert torch.equal(after[: rows.shape[0]][torch.arange(rows.shape[0]) != new], rows[torch.arange(rows.shape[0]) != new])
    metrics = [json.loads(x) for x in (sd_setup / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["inversion", "inversion", "lora", "lora"]


def test_two_processes_equal_one_with_the_same_global_batch(sd_setup):
    """accelerate launch --num_processes 2 (gloo on CPU), 1 image each, trains the adapter 1 process does with 2."""
    kw = dict(mode="dreambooth", instance_prompt="a photo of sks dog", prior_preservation=True, class_prompt="a dog",
              class_data=str(sd_setup / "class"), num_class_images=2, text_encoder=True, random_flip=True,
              noise_offset=0.1, max_steps=3, validation_prompts=[])
    train_sd(config(sd_setup, out=str(sd_setup / "one"), batch_size=2, **kw))
    args = ["--model", str(sd_setup / "pipe"), "--data", str(sd_setup / "images"), "--out", str(sd_setup / "two"),
            "--resolution", "8", "--lr", "1e-2", "--seed", "1", "--batch-size", "1", "--mode", "dreambooth",
            "--instance-prompt", "a photo of sks dog", "--prior-preservation", "--class-prompt", "a dog",
            "--class-data", str(sd_setup / "class"), "--num-class-images", "2", "--text-encoder", "--random-flip",
            "--noise-offset", "0.1", "--max-steps", "3"]
    launch_two("train-sd", args)
    a = assert_same_adapter(sd_setup / "one" / "adapter.safetensors", sd_setup / "two" / "adapter.safetensors")
    assert any("text_encoder." in k for k in a)
    one = [json.loads(x)["loss"] for x in (sd_setup / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x)["loss"] for x in (sd_setup / "two" / "metrics.jsonl").read_text().splitlines()]
    assert one == pytest.approx(two, rel=1e-5)


def test_resume_after_a_kill_gives_the_identical_adapter(sd_setup):
    kw = dict(max_steps=4, save_every=2, validation_prompts=[], random_flip=True)
    train_sd(config(sd_setup, out=str(sd_setup / "straight"), **kw))
    with killed_at(3):
        train_sd(config(sd_setup, out=str(sd_setup / "resumed"), **kw))
    train_sd(config(sd_setup, out=str(sd_setup / "resumed"), resume=True, **kw))
    a = lorakit.read(sd_setup / "straight" / "adapter.safetensors")[0]
    b = lorakit.read(sd_setup / "resumed" / "adapter.safetensors")[0]
    assert all(torch.equal(a.modules[p].B, b.modules[p].B) and torch.equal(a.modules[p].A, b.modules[p].A)
               for p in a.modules)


def test_cached_latents_train_the_same_adapter(sd_setup):
    train_sd(config(sd_setup, out=str(sd_setup / "plain"), validation_prompts=[]))
    train_sd(config(sd_setup, out=str(sd_setup / "cached"), validation_prompts=[], cache_latents=True))
    a = lorakit.read(sd_setup / "plain" / "adapter.safetensors")[0]
    b = lorakit.read(sd_setup / "cached" / "adapter.safetensors")[0]
    assert all(torch.allclose(a.modules[p].B, b.modules[p].B, atol=1e-6) for p in a.modules)


@pytest.mark.parametrize("prompt, clean, tags", [
    ("a dog <lora:style:0.8>", "a dog", [("style", 0.8, 0.8)]),
    ("<lora:slider:-1> a <lora:x:0.5:1.0>dog", "a dog", [("slider", -1.0, -1.0), ("x", 0.5, 1.0)]),
    ("<lora:plain>", "", [("plain", 1.0, 1.0)]),
])
def test_prompt_tags(prompt, clean, tags):
    assert parse_tags(prompt) == (clean, tags)


@pytest.mark.parametrize("bad", ["<lora:x:a>", "<lora::1>", "<lora:x:1:2:3>", "a <lora:x:1"])
def test_malformed_prompt_tags_are_refused(bad):
    with pytest.raises(LoraError, match="lora"):
        parse_tags(bad)


def test_two_weighted_loras_generate_what_the_fused_pipeline_does(sd_setup):
    for name, seed in (("one", 1), ("two", 2)):
        train_sd(config(sd_setup, out=str(sd_setup / name), seed=seed, max_steps=2, validation_prompts=[]))
    (sd_setup / "loras").mkdir()
    for name in ("one", "two"):
        (sd_setup / "loras" / f"{name}.safetensors").write_bytes((sd_setup / name / "adapter.safetensors").read_bytes())
    images = []
    for fuse in (False, True):
        pipe, prompt = load_pipeline(None, [str(sd_setup / "one" / "adapter.safetensors") + ":0.7"],
                                     "a dog <lora:two:-0.5>", str(sd_setup / "loras"), fuse=fuse)
        assert prompt == "a dog" and lorakit.active(pipe) == {"lora0": 0.7, "lora1": -0.5}
        images.append(pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=8, width=8,
                           output_type="np").images)
    base, _ = load_pipeline(str(sd_setup / "pipe"), [], "a dog")
    plain = base("a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=8, width=8,
                 output_type="np").images
    assert np.abs(images[0] - images[1]).max() < 1e-4
    assert np.abs(images[0] - plain).max() > 1e-3  # the LoRAs do something


def test_loss_options_run_and_v_prediction_uses_the_velocity(sd_setup):
    import json as _json

    from diffusers import DDPMScheduler

    from lorakit.sd.diffusion import denoising_loss, draw, snr_weights

    cfg_path = sd_setup / "pipe" / "scheduler" / "scheduler_config.json"
    sched = _json.loads(cfg_path.read_text())
    cfg_path.write_text(_json.dumps({**sched, "prediction_type": "v_prediction"}))
    runs = {p: train_sd(config(sd_setup, out=str(sd_setup / p), max_steps=2, snr_gamma=5.0, noise_offset=0.1,
                               precision=p, gradient_checkpointing=True, validation_prompts=[]))
            for p in ("fp32", "bf16")}
    # bf16 autocast is on (the loss is not bit-equal to fp32's) and learns what fp32 does: B (zero at the start) is the
    # update, pointing the same way (cosine measured 0.999) with the same size (0.343 vs 0.344); the factors stay fp32
    fp32, bf16 = runs["fp32"]["final_loss"], runs["bf16"]["final_loss"]
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=1e-2)
    factors = {p: load_file(r["adapter"]) for p, r in runs.items()}
    assert {t.dtype for t in factors["bf16"].values()} == {torch.float32}
    b32, b16 = (torch.cat([t.flatten() for k, t in factors[p].items() if k.endswith(".B")]) for p in ("fp32", "bf16"))
    assert b32.norm() > 0.1 and torch.nn.functional.cosine_similarity(b32, b16, 0) > 0.99
    assert b16.norm() == pytest.approx(b32.norm().item(), rel=0.02)
    # v-prediction: a UNet that outputs exactly v has zero loss; Min-SNR weights follow the formula
    s = DDPMScheduler(prediction_type="v_prediction")
    x0 = torch.randn(2, 4, 8, 8)

    class Oracle(torch.nn.Module):
        def forward(self, noisy, t, encoder_hidden_states):
            a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
            eps = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
            return type("Out", (), {"sample": s.get_velocity(x0, eps, t)})()

    noise, t = draw(s, x0, torch.Generator().manual_seed(0))
    loss = denoising_loss(Oracle(), s, x0, None, noise, t, snr_gamma=5.0)
    assert loss.abs().max() < 1e-4
    t = torch.tensor([10, 900])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    assert torch.allclose(snr_weights(s.alphas_cumprod, t, 5.0, "v_prediction"), torch.clamp(snr, max=5) / (snr + 1))


def test_lora_plus_trains_b_at_ratio_times_each_groups_rate(sd_setup):
    """Adam's first step moves B (zero at start) by ±lr: the UNet's lr and the text encoder's text_lr, times 16."""
    read = {}
    for ratio in (None, 16.0):
        out = sd_setup / f"run-{ratio}"
        train_sd(config(sd_setup, out=str(out), max_steps=1, validation_prompts=[], text_encoder=True,
                        lora_plus_ratio=ratio))
        read[ratio] = lorakit.read(out / "adapter.safetensors")[0].modules
    for path, m in read[None].items():
        lr = 1e-2 if path.startswith("unet.") else 5e-5
        assert m.B.abs().max().item() == pytest.approx(lr, rel=1e-3), path
        assert read[16.0][path].B.abs().max().item() == pytest.approx(16 * lr, rel=1e-3), path
        assert torch.equal(m.A, read[16.0][path].A)
    assert any(p.startswith("text_encoder.") for p in read[None])


def test_a_data_set_of_images_and_captions_trains_as_its_folder_does(sd_setup, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("LORAKIT_CACHE", str(sd_setup / "lk"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", sd_setup / "hf-datasets")
    rows = [json.loads(line) for line in (sd_setup / "images" / "metadata.jsonl").read_text().splitlines()]
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"picture": [str(sd_setup / "images" / r["file_name"]) for r in rows],
                                     "caption": [r["text"] for r in rows]}, features=features)
    ds.to_parquet(str(sd_setup / "images.parquet"))  # the images themselves go into the file
    ds.save_to_disk(str(sd_setup / "saved"))
    train_sd(config(sd_setup, validation_prompts=[]))
    train_sd(config(sd_setup, data=str(sd_setup / "images.parquet"), out=str(sd_setup / "pq"), validation_prompts=[],
                    image_field="picture"))  # captions from `caption`, found by name
    assert_same_adapter(sd_setup / "run" / "adapter.safetensors", sd_setup / "pq" / "adapter.safetensors")
    card = yaml.safe_load((sd_setup / "pq" / "README.md").read_text().split("---")[1])
    assert card["training_data"]["name"] == "images.parquet" and len(card["training_data"]["sha256"]) == 64
    with pytest.raises(LoraError, match=r"saved: no image column \(image, img\) among its columns picture, caption"):
        train_sd(config(sd_setup, data=str(sd_setup / "saved"), out=str(sd_setup / "x")))
    with pytest.raises(LoraError, match="--caption-field nope among its columns picture, caption"):
        train_sd(config(sd_setup, data=str(sd_setup / "saved"), out=str(sd_setup / "x"), image_field="picture",
                        caption_field="nope"))
