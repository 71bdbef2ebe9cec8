"""Adapters by hub id (`owner/name[@REV][:FILE]`), with no network: repos laid out in a Hugging Face cache as
huggingface_hub lays them out (blobs, snapshots/<commit>/ links, refs/<revision>), read with HF_HUB_OFFLINE."""

import shutil
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from conftest import cache_repo
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.core.errors import LoraError
from lorakit.formats.hub import Ref, name_of, parse
from lorakit.formats.io import base_model, parse_adapter

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40  # two commits of one repo


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline hub cache (this process and the subprocesses it starts)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def tiny_with_adapter(tmp_path, save_tiny, seed=1, **save):
    """(base folder, model with a trained-looking adapter, its lorakit file)."""
    base = tmp_path / "base"
    if not base.exists():
        save_tiny(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    path = tmp_path / f"adapter{seed}.safetensors"
    lorakit.save(model, path, **save)
    return base, model, path


def logits(model):
    with torch.no_grad():
        return model(torch.tensor([[2, 3, 4, 2]])).logits


def fresh(base):
    return AutoModelForCausalLM.from_pretrained(base)


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse("user/style") == Ref("user/style")
    assert parse("user/style@v1.0:sub/w.safetensors") == Ref("user/style", "v1.0", "sub/w.safetensors")
    assert parse("user/style:w.safetensors") == Ref("user/style", None, "w.safetensors")
    assert parse("out/adapter.safetensors") is None  # a missing file is a path, not a repo named adapter.safetensors
    assert parse("./user/style") is None and parse("/abs/x") is None and parse("style.safetensors") is None
    (tmp_path / "user" / "style").mkdir(parents=True)
    assert parse("user/style") is None  # a path that exists wins
    assert parse_adapter("user/style:w.safetensors:-0.5") == ("user/style:w.safetensors", -0.5)
    assert parse_adapter("user/style@v1:0.5") == ("user/style@v1", 0.5)
    assert name_of("user/style") == "style" and name_of("user/style:pytorch_lora_weights.safetensors") == "style"
    assert name_of("user/packs:anime.safetensors") == "anime"


def test_a_lorakit_adapter_loads_by_hub_id_like_its_file(tmp_path, save_tiny, hub):
    base, trained, path = tiny_with_adapter(tmp_path, save_tiny)
    cache_repo(hub, "user/style", {"adapter.safetensors": path, "README.md": "---\nlicense: mit\n---\n"})
    model = fresh(base)
    assert lorakit.load(model, "user/style") == "style"
    assert torch.equal(logits(model), logits(trained))
    a, fmt = lorakit.read("user/style")
    assert fmt == "lorakit" and lorakit.read(path)[0].base_model == str(base)
    assert a.base_model is None  # the file records its local base relative to itself: nothing beside a hub copy


def test_revisions_pick_their_commit(tmp_path, save_tiny, hub):
    base, one, p1 = tiny_with_adapter(tmp_path, save_tiny, seed=1)
    _, two, p2 = tiny_with_adapter(tmp_path, save_tiny, seed=2)
    cache_repo(hub, "user/style", {"adapter.safetensors": p1}, COMMIT_A, refs=("v1",))
    cache_repo(hub, "user/style", {"adapter.safetensors": p2}, COMMIT_B, refs=("main",))
    for spec, want in [("user/style", two), ("user/style@v1", one), (f"user/style@{COMMIT_A}", one),
                       ("user/style@main:adapter.safetensors", two)]:
        model = fresh(base)
        lorakit.load(model, spec)
        assert torch.equal(logits(model), logits(want)), spec


def test_a_repo_of_several_files_follows_diffusers_rule_and_says_which(tmp_path, save_tiny, hub, capsys):
    base, chosen, p1 = tiny_with_adapter(tmp_path, save_tiny, seed=1)
    _, other, p2 = tiny_with_adapter(tmp_path, save_tiny, seed=2)
    cache_repo(hub, "user/packs", {"a_first.safetensors": p2, "pytorch_lora_weights.safetensors": p1,
                                   "optimizer.safetensors": p2, "checkpoint-500/pytorch_lora_weights.safetensors": p2})
    model = fresh(base)
    assert lorakit.load(model, "user/packs") == "packs"
    assert torch.equal(logits(model), logits(chosen))
    err = capsys.readouterr().err
    assert "using pytorch_lora_weights.safetensors" in err and "a_first.safetensors" in err and "user/packs:FILE" in err
    model = fresh(base)
    assert lorakit.load(model, "user/packs:a_first.safetensors") == "a_first"  # :FILE picks one
    assert torch.equal(logits(model), logits(other))
    cache_repo(hub, "user/two", {"b.safetensors": p1, "a.safetensors": p2, "scheduler.safetensors": p1})
    model = fresh(base)
    lorakit.load(model, "user/two")  # no pytorch_lora_weights: the first of the others, never the scheduler
    assert torch.equal(logits(model), logits(other))


def test_a_peft_repo_loads_as_a_folder_and_in_a_subfolder(tmp_path, save_tiny, hub):
    base, trained, _ = tiny_with_adapter(tmp_path, save_tiny)
    folder = lorakit.save(trained, tmp_path / "peft", format="peft")
    files = {f.name: f for f in folder.iterdir()}
    cache_repo(hub, "user/peft-style", {**files, "other.safetensors": files["adapter_model.safetensors"]})
    cache_repo(hub, "user/many", {f"style/{k}": v for k, v in files.items()})
    for spec, name in [("user/peft-style", "peft-style"), ("user/many:style", "style")]:
        model = fresh(base)
        assert lorakit.load(model, spec) == name
        assert lorakit.read(spec)[1] == "peft"
        torch.testing.assert_close(logits(model), logits(trained), rtol=0, atol=1e-6)


def test_the_base_model_comes_from_the_card_when_the_file_records_none(tmp_path, save_tiny, hub):
    _, _, path = tiny_with_adapter(tmp_path, save_tiny)
    with safe_open(str(path), "pt") as f:
        header = {**f.metadata(), "base_model": ""}  # as kohya and diffusers files: no base recorded
    file = tmp_path / "nobase.safetensors"
    save_file(load_file(str(path)), str(file), metadata=header)
    assert lorakit.read(file)[0].base_model is None
    card = "---\nbase_model: stabilityai/some-base\ntags:\n- lora\n---\n# A LoRA\n"
    cache_repo(hub, "user/k", {"lora.safetensors": file, "README.md": card})
    assert lorakit.read("user/k")[0].base_model == "stabilityai/some-base"
    assert base_model(None, ["user/k"]) == "stabilityai/some-base"
    local = tmp_path / "folder"
    local.mkdir()
    shutil.copy(file, local / "lora.safetensors")
    (local / "README.md").write_text(card.replace("some-base", "local-card-base"))
    assert lorakit.read(local / "lora.safetensors")[0].base_model == "stabilityai/local-card-base"


def test_missing_repos_files_and_revisions_are_one_clear_error(tmp_path, save_tiny, hub):
    base, _, path = tiny_with_adapter(tmp_path, save_tiny)
    cache_repo(hub, "user/style", {"adapter.safetensors": path, "notes.txt": "x"})
    cache_repo(hub, "user/empty", {"notes.txt": "x"})
    model = fresh(base)
    before = logits(model)
    cases = [("user/nope", "not in the Hugging Face cache, and HF_HUB_OFFLINE is set"),
             ("user/style@v9", "not in the Hugging Face cache"),
             ("user/style:missing.safetensors", "no file or folder 'missing.safetensors'; it has adapter.safetensors"),
             ("user/empty", "no adapter in the repo"),
             ("out/missing.safetensors", "no such file")]
    for spec, message in cases:
        with pytest.raises(LoraError, match="^" + r"[^\n]*" + message.replace(".", r"\.").replace("(", r"\(")):
            lorakit.load(model, spec)
    assert lorakit.adapters(model) == [] and torch.equal(logits(model), before)


def test_cli_commands_take_hub_ids(tmp_path, save_tiny, hub, capsys):
    base, trained, path = tiny_with_adapter(tmp_path, save_tiny)
    cache_repo(hub, "user/style", {"adapter.safetensors": path})
    assert main(["inspect", "user/style"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("file:        user/style (") and "format:      lorakit" in out
    assert main(["convert", "user/style", str(tmp_path / "p"), "--to", "peft"]) == 0
    assert main(["combine", "user/style:0.5", "user/style:adapter.safetensors:0.5", "--out",
                 str(tmp_path / "c.safetensors")]) == 0
    assert main(["merge-into", "--model", str(base), "--adapter", "user/style", "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(logits(fresh(tmp_path / "merged")), logits(trained), rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main(["generate", "--model", str(base), "--adapter", "user/style", "--prompt", "a b", "--max-new-tokens",
                 "2"]) == 0
    assert capsys.readouterr().out.startswith(">>> a b\n")


def test_cli_error_for_a_missing_repo_is_one_line(hub):
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", "user/not-cached"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "lorakit: error: user/not-cached: not in the Hugging Face cache, and HF_HUB_OFFLINE is set; download it once "
        "online, or unset HF_HUB_OFFLINE; if you meant a local file, check the path"]


def test_generate_image_takes_a_diffusers_lora_by_hub_id(tmp_path, tiny_sd, hub):
    from lorakit.sd.generate import load_pipeline

    tiny_sd.save_pretrained(tmp_path / "pipe")
    lorakit.inject(tiny_sd.unet, lorakit.LoraConfig(r=2, alpha=2, targets=["to_q", "to_v"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in tiny_sd.unet.named_parameters():
            if "lora_" in n:
                p.normal_()
    file = lorakit.save(tiny_sd, tmp_path / "d", format="diffusers", base_model=str(tmp_path / "pipe"))
    card = f"---\nbase_model: {tmp_path / 'pipe'}\ninstance_prompt: a dog\n---\n"  # diffusers' way to name the base
    cache_repo(hub, "user/sd-style", {"pytorch_lora_weights.safetensors": file, "README.md": card})
    pipe, prompt = load_pipeline(None, ["user/sd-style:0.7"], "a dog", triggers={"sd-style": ["dog"]})
    assert lorakit.active(pipe.unet) == {"lora0": 0.7} and prompt == "a dog"
