"""`lorakit push`: the staged repo folder (--dry-run) of a real tiny LLM run and SD run holds exactly the adapter in
the chosen formats, the curve, metrics and sample grids, and a hub-convention card without local paths; its PEFT and
diffusers exports load with peft and diffusers themselves, equal to lorakit's adapter; the upload path calls
huggingface_hub as it should and fails in one line (offline, not logged in, HTTP errors)."""

import hashlib
import json

import huggingface_hub
import pytest
import torch
from conftest import _save_tiny, cache_repo, clip_tokenizer, sd_workspace, tiny_clip, tiny_unet
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.options import build

LLM_FILES = ["README.md", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors", "loss.png",
             "metrics.jsonl"]
SD_FILES = ["README.md", "adapter.safetensors", "loss.png", "metrics.jsonl", "pytorch_lora_weights.safetensors",
            "samples/step-000002.png"]


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    """TMP with m/ (tiny Llama), train.jsonl and run/ (a 2-step LoRA run with eval); returns (TMP, result)."""
    from lorakit.llm.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("llm")
    _save_tiny(tmp / "m")
    lines = [{"text": " ".join("abc"[(i + k) % 3] for k in range(9))} for i in range(16)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = train(build(TrainConfig, dict(model=str(tmp / "m"), data=str(tmp / "train.jsonl"), out=str(tmp / "run"),
                                           targets=["q_proj", "v_proj"], r=4, alpha=8, lr=5e-2, max_steps=2,
                                           batch_size=4, eval_data=str(tmp / "train.jsonl"))))
    return tmp, result


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """TMP with pipe/ (tiny SD pipeline), images/ and run/ (a 2-step dreambooth LoRA run with a sample grid)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline

    from lorakit.sd.train import SDTrainConfig, train_sd

    tmp = tmp_path_factory.mktemp("sd")
    torch.manual_seed(2)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=tiny_clip(), tokenizer=clip_tokenizer(tmp / "tok"),
                                   unet=tiny_unet(), scheduler=DPMSolverMultistepScheduler(steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd_workspace(pipe, tmp)
    train_sd(build(SDTrainConfig, dict(model=str(tmp / "pipe"), data=str(tmp / "images"), out=str(tmp / "run"),
                                       mode="dreambooth", instance_prompt="a photo of sks dog", resolution=8,
                                       max_steps=2, lr=5e-2, seed=1, validation_prompts=["a dog"],
                                       num_validation_images=1, validation_steps=1)))
    return tmp


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def assert_no_local_path(folder, tmp):
    """No text file and no safetensors header in `folder` holds the test's tmp path."""
    for f in folder.rglob("*"):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as sf:
                assert str(tmp) not in json.dumps(sf.metadata()), f
        elif f.suffix in (".md", ".json", ".jsonl"):
            assert str(tmp) not in f.read_text(), f


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logits(model):
    with torch.no_grad():
        return model(torch.tensor([[2, 3, 4, 2]])).logits


def test_the_run_card_follows_the_hub_conventions_without_local_paths(llm_run):
    tmp, result = llm_run
    card = ModelCard.load(tmp / "run" / "README.md")
    assert str(tmp) not in str(card)
    data = card.data.to_dict()
    assert data["training_data"] == {"name": "train.jsonl", "bytes": (tmp / "train.jsonl").stat().st_size,
                                     "sha256": sha256(tmp / "train.jsonl")}
    assert data["pipeline_tag"] == "text-generation" and data["tags"] == ["lora", "lorakit", "text-generation"]
    assert card.data.eval_results[0].metric_value == result["eval_loss"]


def test_llm_dry_run_stages_a_peft_repo_and_a_hub_card(llm_run, capsys):
    tmp, result = llm_run
    out = tmp / "staged"
    assert main(["push", str(tmp / "run"), "--repo", "me/tiny-lm", "--dry-run", str(out),
                 "--base-model", "org/tiny-llama"]) == 0
    assert files(out) == LLM_FILES
    printed = capsys.readouterr().out
    assert str(out) in printed and all(f in printed for f in LLM_FILES)
    assert_no_local_path(out, tmp)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert (data["base_model"], data["base_model_relation"], data["library_name"]) == ("org/tiny-llama", "adapter",
                                                                                        "lorakit")
    assert {"lora", "lorakit", "peft", "text-generation"} <= set(data["tags"])
    assert data["training_data"]["sha256"] == sha256(tmp / "train.jsonl")
    assert data["model-index"][0]["name"] == "tiny-lm" and "loss" in data["metrics"]
    assert card.data.eval_results[0].metric_value == result["eval_loss"]
    assert 'lorakit.load(model, "me/tiny-lm")' in card.text and 'PeftModel.from_pretrained(' in card.text
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    assert lorakit.read(out / "adapter.safetensors")[0].base_model == "org/tiny-llama"


def test_the_exports_load_with_peft_and_lorakit_alike(llm_run, monkeypatch):
    from peft import PeftModel

    tmp, _ = llm_run
    out = tmp / "plain"
    assert main(["push", str(tmp / "run"), "--repo", "me/tiny-lm", "--dry-run", str(out)]) == 0
    assert "base_model" not in ModelCard.load(out / "README.md").data.to_dict()  # a local base has no hub id
    want = AutoModelForCausalLM.from_pretrained(tmp / "m")
    base = logits(want)
    lorakit.load(want, tmp / "run" / "adapter.safetensors")
    want = logits(want)
    assert (want - base).abs().max() > 1e-4  # the adapter changes the outputs
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp / "m"), str(out))
    torch.testing.assert_close(logits(peft_model), want, atol=1e-5, rtol=1e-5)
    folder = AutoModelForCausalLM.from_pretrained(tmp / "m")
    lorakit.load(folder, out)
    torch.testing.assert_close(logits(folder), want, atol=1e-5, rtol=1e-5)
    # as the hub would serve the repo: lorakit.load by its id (offline, from a cache holding the staged files)
    cache = tmp / "hf-cache"
    cache_repo(cache, "me/tiny-lm", {f: out / f for f in files(out)})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    by_id = AutoModelForCausalLM.from_pretrained(tmp / "m")
    lorakit.load(by_id, "me/tiny-lm")
    torch.testing.assert_close(logits(by_id), want, atol=1e-5, rtol=1e-5)


def test_sd_dry_run_stages_diffusers_weights_samples_and_a_widget(sd_run):
    from diffusers import StableDiffusionPipeline

    out = sd_run / "run" / "hub-upload"
    assert main(["push", str(sd_run / "run"), "--repo", "me/sks-dog", "--dry-run", "--format", "lorakit,diffusers",
                 "--format", "kohya"]) == 0
    assert files(out) == sorted([*SD_FILES, "sks-dog.safetensors"])
    assert_no_local_path(out, sd_run)
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["instance_prompt"] == "a photo of sks dog" and data["pipeline_tag"] == "text-to-image"
    assert data["widget"] == [{"text": "a dog", "output": {"url": "samples/step-000002.png"}}]
    assert {"lora", "lorakit", "diffusers", "text-to-image", "template:sd-lora"} <= set(data["tags"])
    assert data["training_data"]["name"] == "images" and len(data["training_data"]["sha256"]) == 64
    assert lorakit.read(out / "sks-dog.safetensors")[1] == "kohya"
    # diffusers' own loader takes pytorch_lora_weights.safetensors from the folder: the UNet equals lorakit's
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 16)
    with_diffusers = StableDiffusionPipeline.from_pretrained(sd_run / "pipe")
    with_diffusers.load_lora_weights(str(out))
    with_lorakit = StableDiffusionPipeline.from_pretrained(sd_run / "pipe")
    lorakit.load(with_lorakit, sd_run / "run" / "adapter.safetensors")
    with torch.no_grad():
        got, want = with_diffusers.unet(x, t, text).sample, with_lorakit.unet(x, t, text).sample
        base = StableDiffusionPipeline.from_pretrained(sd_run / "pipe").unet(x, t, text).sample
    assert (want - base).abs().max() > 1e-5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # a second dry run replaces the first one's folder
    assert main(["push", str(sd_run / "run"), "--repo", "me/sks-dog", "--dry-run"]) == 0
    assert files(out) == SD_FILES


def test_bad_pushes_are_one_line_errors(llm_run, sd_run, capsys):
    tmp, _ = llm_run
    run = str(tmp / "run")
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("x")
    (tmp / "full" / "model").mkdir(parents=True)
    cases = [
        (["push", str(tmp / "m"), "--repo", "me/x", "--dry-run"], "holds no adapter (adapter.safetensors); it holds"),
        (["push", str(tmp / "full"), "--repo", "me/x", "--dry-run"], "full fine-tune (model/)"),
        (["push", run, "--repo", "no-owner", "--dry-run"], "not a hub repo id"),
        (["push", run, "--repo", "me/x", "--format", "gguf", "--dry-run"], "--format 'gguf'"),
        (["push", run, "--repo", "me/x", "--dry-run", str(tmp / "notes")], "holds other files"),
        (["push", str(sd_run / "run"), "--repo", "me/x", "--format", "lorakit,kohya", "--dry-run"], "ambiguous"),
        (["push", run, "--repo", "me/x", "--base-model", "/abs/path", "--dry-run"], "not a hub model id"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lorakit: error:") and message in err and err.count("\n") == 1, (argv, err)
    assert (tmp / "notes" / "todo.txt").read_text() == "x"


def test_upload_offline_or_logged_out_is_one_error_line(llm_run, monkeypatch, capsys, tmp_path):
    tmp, _ = llm_run
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(tmp / "run"), "--repo", "me/tiny-lm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: HF_HUB_OFFLINE is set") and err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    assert main(["push", str(tmp / "run"), "--repo", "me/tiny-lm"]) == 2
    err = capsys.readouterr().err
    assert "not logged in" in err and "hf auth login" in err and err.count("\n") == 1


def test_upload_creates_the_repo_and_uploads_the_staged_folder_once(llm_run, monkeypatch, capsys):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    tmp, _ = llm_run
    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: calls.append(("create", repo, kw)) or
                        f"https://huggingface.co/{repo}")
    monkeypatch.setattr(huggingface_hub, "create_branch", lambda repo, **kw: calls.append(("branch", repo, kw)))

    def upload_folder(**kw):
        calls.append(("upload", files(kw["folder_path"]), kw))

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    assert main(["push", str(tmp / "run"), "--repo", "me/tiny-lm", "--private", "--token", "hf_x", "--branch",
                 "v1"]) == 0
    assert "https://huggingface.co/me/tiny-lm" in capsys.readouterr().out
    (_, repo, create), (_, _, branch), (_, uploaded, kw) = calls
    assert (repo, create) == ("me/tiny-lm", {"private": True, "exist_ok": True, "token": "hf_x"})
    assert branch == {"branch": "v1", "token": "hf_x", "exist_ok": True}
    assert uploaded == LLM_FILES and (kw["repo_id"], kw["revision"]) == ("me/tiny-lm", "v1")
    assert "*.safetensors" in kw["delete_patterns"]  # a re-push leaves no stale weights for the loaders to pick

    def refused(**kw):
        request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
        raise HfHubHTTPError("403 Forbidden: you have no write access", response=httpx2.Response(403, request=request))

    monkeypatch.setattr(huggingface_hub, "upload_folder", refused)
    assert main(["push", str(tmp / "run"), "--repo", "me/tiny-lm", "--token", "hf_x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: me/tiny-lm: the hub answered HTTP 403") and err.count("\n") == 1


def test_cards_record_hub_ids_as_ids_and_local_paths_by_name(tmp_path):
    from lorakit import runner

    front = runner.card_front("org/base", "user/ds:train", None, "text-generation", ["lora"], {})
    assert (front["base_model"], front["base_model_relation"]) == ("org/base", "adapter")
    assert front["datasets"] == ["user/ds"] and front["training_data"] == {"dataset": "user/ds:train"}
    (tmp_path / "m").mkdir()
    front = runner.card_front(str(tmp_path / "m"), str(tmp_path / "m"), None, "text-generation", ["lora"], {})
    assert "base_model" not in front and "datasets" not in front and front["training_data"]["files"] == 0
    assert runner.public_settings({"model": str(tmp_path / "m"), "out": "/x/run", "lr": 1.0}) == \
        {"model": "m", "out": "run", "lr": 1.0}


def test_a_card_naming_other_local_paths_is_pushed_with_their_names_only(llm_run, tmp_path):
    """An older run's card (data and eval data by absolute path, settings a resume may change and run.json omits)."""
    import shutil

    tmp, _ = llm_run
    old = tmp_path / "old-run"
    shutil.copytree(tmp / "run", old, ignore=shutil.ignore_patterns("checkpoints", "hub-upload"))
    elsewhere = tmp_path / "elsewhere" / "eval.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_text("{}\n")
    card = (old / "README.md").read_text()
    (old / "README.md").write_text(card + f"\nEval data: {elsewhere}; cache ~/.cache and https://huggingface.co/x/y\n")
    assert main(["push", str(old), "--repo", "me/old", "--dry-run", str(tmp_path / "stage")]) == 0
    text = (tmp_path / "stage" / "README.md").read_text()
    assert str(tmp_path) not in text and "Eval data: eval.jsonl;" in text and "https://huggingface.co/x/y" in text
