"""The command line under bad input: every mistake ends in one `lorakit: error:` line naming the problem (exit code
2, no traceback); generate-image's <lora:NAME:TE:UNET> tags for every format; --device for both generate commands."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _save_tiny, clip_tokenizer, tiny_clip, tiny_unet

import lorakit
from lorakit.cli import main
from lorakit.core.errors import LoraError
from lorakit.sd.generate import load_pipeline


@pytest.fixture
def sd_loras(tiny_sd, tmp_path):
    """A saved tiny SD pipeline and, in loras/, one LoRA on its text encoder and UNet in several formats, plus
    `unet_only` and `te_only` saved from the lone components (module paths without a component prefix)."""
    tiny_sd.save_pretrained(tmp_path / "pipe")
    lorakit.inject(tiny_sd, lorakit.LoraConfig(r=2, alpha=2, targets=["to_q", "to_k", "q_proj"], init=False), name="x")
    for fmt in ("kohya", "diffusers", "lorakit"):
        lorakit.save(tiny_sd, tmp_path / "loras" / f"{fmt}.safetensors", format=fmt, base_model=str(tmp_path / "pipe"))
    lorakit.save(tiny_sd.unet, tmp_path / "loras" / "unet_only.safetensors", base_model=str(tmp_path / "pipe"))
    lorakit.save(tiny_sd.text_encoder, tmp_path / "loras" / "te_only.safetensors", base_model=str(tmp_path / "pipe"))
    return tmp_path


def images(pipe, prompt="a dog"):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=8, width=8,
                output_type="np").images


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_tag_with_two_weights_equals_the_two_parts_loaded_with_those_weights(sd_loras, fmt):
    pipe, prompt = load_pipeline(str(sd_loras / "pipe"), [], f"a dog <lora:{fmt}:0.3:-0.8>", str(sd_loras / "loras"))
    assert lorakit.active(pipe) == {"lora0_text_encoder": 0.3, "lora0_unet": -0.8}
    ref, _ = load_pipeline(str(sd_loras / "pipe"), [], "a dog")
    path = sd_loras / "loras" / f"{fmt}.safetensors"
    te = lorakit.load(ref.text_encoder, path, name="te", component="text_encoder")
    un = lorakit.load(ref.unet, path, name="un", component="unet")
    lorakit.set_weights(ref, {te: 0.3, un: -0.8})
    plain, _ = load_pipeline(str(sd_loras / "pipe"), [], "a dog")
    ours = images(pipe, prompt)
    assert np.abs(ours - images(ref)).max() < 1e-5
    assert np.abs(ours - images(plain)).max() > 1e-3


def test_tag_weights_reach_a_file_whose_modules_name_no_component(sd_loras):
    pipe, _ = load_pipeline(str(sd_loras / "pipe"), [], "a <lora:unet_only:0.3:-0.8> <lora:te_only:0.5:2>",
                            str(sd_loras / "loras"))
    assert lorakit.active(pipe) == {"lora0": -0.8, "lora1": 0.5}  # the UNet weight, the text-encoder weight
    ref, _ = load_pipeline(str(sd_loras / "pipe"), [], "a dog")
    lorakit.set_weights(ref, {lorakit.load(ref.unet, sd_loras / "loras" / "unet_only.safetensors"): -0.8,
                              lorakit.load(ref.text_encoder, sd_loras / "loras" / "te_only.safetensors"): 0.5})
    assert np.abs(images(pipe) - images(ref)).max() < 1e-5


def test_a_lora_that_fits_no_component_is_an_error(sd_loras):
    m = torch.nn.ModuleDict({"nowhere": torch.nn.Linear(4, 4)})
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=2, targets=["nowhere"], init=False), name="x")
    lorakit.save(m, sd_loras / "loras" / "stray.safetensors")
    for tag in ("<lora:stray:0.3:1>", "<lora:stray:1>"):
        with pytest.raises(LoraError, match="'nowhere'"):
            load_pipeline(str(sd_loras / "pipe"), [], f"a {tag}", str(sd_loras / "loras"))


def test_device_cpu_works_and_a_bogus_device_is_one_line(sd_loras, save_tiny, capsys):
    llm = str(save_tiny(sd_loras / "llm"))
    assert main(["generate", "--model", llm, "--prompt", "a b", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert main(["generate-image", "--lora", str(sd_loras / "loras" / "kohya.safetensors"), "--prompt", "a dog",
                 "--steps", "1", "--count", "1", "--size", "8", "--device", "cpu", "--out",
                 str(sd_loras / "g.png")]) == 0
    capsys.readouterr()
    for cmd in (["generate", "--model", llm, "--prompt", "a"], ["generate-image", "--model", str(sd_loras / "pipe"),
                                                                "--prompt", "a"]):
        for bogus in ("gpu7", "cuda:99" if torch.cuda.is_available() else "cuda"):
            assert main([*cmd, "--device", bogus]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("lorakit: error: --device") and bogus in err, err


# --- bad invocations -----------------------------------------------------------------------------------------------
# (command line, a fragment of its one error line); {d} is the workspace below. TRAIN/SD: a run that would start.
TRAIN = "train --model {d}/m --data {d}/data.jsonl --out {d}/run --max-steps 1"
SD = "train-sd --model {d}/pipe --data {d}/images --out {d}/run --max-steps 1"
IN_PROCESS = [
    ("inspect {d}/missing.safetensors", "missing.safetensors: no such file"),
    ("inspect {d}/empty.safetensors", "empty.safetensors: not a readable safetensors file"),
    ("inspect {d}/corrupt.safetensors", "corrupt.safetensors: not a readable safetensors file"),
    ("inspect {d}/peft_latin1", "adapter_config.json: not valid JSON ('utf-8' codec can't decode"),
    ("inspect {d}/peft_badjson", "adapter_config.json: not valid JSON"),
    ("inspect {d}/nolora", "nolora is a folder without adapter_config.json"),
    ("inspect {d}/x.bin", "x.bin is a pickle file"),
    ("inspect {d}/m/model.safetensors", "model.safetensors: not a LoRA file lorakit knows"),
    ("convert {d}/m.safetensors {d}/o.safetensors --to nope", "argument --to: invalid choice: 'nope'"),
    ("convert {d}/missing.safetensors {d}/o.safetensors --to kohya", "missing.safetensors: no such file"),
    ("convert {d}/m.safetensors {d}/data.jsonl --to peft", "data.jsonl is a file; a PEFT adapter is a folder"),
    ("convert {d}/m.safetensors {d}/o.safetensors --to kohya", "is not in a Stable Diffusion unet or text encoder"),
    ("convert {d}/m.safetensors /proc/nope/o.safetensors --to lorakit", "/proc/nope: No such file or directory"),
    ("train --config {d}/missing.yaml", "missing.yaml does not exist"),
    ("train --config {d}/unknown.yaml", "unknown.yaml: unknown key 'modle'"),
    ("train --config {d}/latin1.yaml", "latin1.yaml: not UTF-8 text"),
    ("train --config {d}/broken.yaml", "broken.yaml is not valid YAML"),
    ("train --config {d}/list.yaml", "list.yaml holds a list"),
    (TRAIN + " --r 0", "LoraConfig.r must be a positive integer, got 0"),
    (TRAIN + " --r -2", "LoraConfig.r must be a positive integer, got -2"),
    (TRAIN + " --lr abc", "--lr: expected a number, got 'abc'"),
    (TRAIN + " --lr -1", "TrainConfig.lr (--lr) must be more than 0, got -1.0"),
    (TRAIN + " --batch-size 0", "TrainConfig.batch_size (--batch-size) must be more than 0, got 0"),
    (TRAIN + " --max-steps -1", "TrainConfig.max_steps (--max-steps) must be more than 0, got -1"),
    (TRAIN + " --lora-plus-ratio 0", "TrainConfig.lora_plus_ratio (--lora-plus-ratio) must be more than 0, got 0.0"),
    (TRAIN + " --quantize bogus", "--quantize: expected one of 'nf4', 'int8' or null, got 'bogus'"),
    (TRAIN + " --init svd", "LoraConfig.init must be True, False, 'gaussian', 'pissa', 'pissa_niter_K'"),
    (TRAIN + " --text-field body", "no field 'body' (--text-field)"),
    (TRAIN + " --streaming --max-steps 0", "must be more than 0"),
    (TRAIN.replace("data.jsonl", "data.xlsx"), "data.xlsx: unknown data format '.xlsx'"),
    (TRAIN.replace("data.jsonl", "data.jsonl:test"), "a .jsonl file has no splits"),
    ("push {d}/nofolder --repo a/b --dry-run", "no such run folder"),
    ("push {d}/m --repo a/b --dry-run", "holds no adapter (adapter.safetensors); it holds config.json"),
    ("push {d}/pushrun --repo noslash --dry-run", "--repo 'noslash' is not a hub repo id"),
    ("push {d}/pushrun --repo a/b --format gguf --dry-run", "--format 'gguf': choose from"),
    ("push {d}/pushrun --repo a/b --dry-run {d}/data.jsonl", "is a file; give a folder"),
    ("push {d}/pushrun --repo a/b --dry-run {d}/images", "is a folder that holds other files"),
    ("push {d}/pushrun --repo a/b --base-model {d}/m --dry-run", "is not a hub model id"),
    (TRAIN + " --use-dora --targets embed_tokens", "DoRA is not supported on an embedding layer"),
    (TRAIN + " --dropout 1.5", "LoraConfig.dropout must be in [0, 1), got 1.5"),
    (TRAIN + " --targets nonexistent_proj", "targets entry 'nonexistent_proj' matches no module"),
    (TRAIN.replace("data.jsonl", "missing.jsonl"), "missing.jsonl: no such file"),
    (TRAIN.replace("data.jsonl", "empty.jsonl"), "empty.jsonl: no examples"),
    (TRAIN.replace("data.jsonl", "latin1.jsonl"), "latin1.jsonl: not UTF-8 text"),
    (TRAIN.replace("data.jsonl", "broken.jsonl"), "broken.jsonl:2: not valid JSON"),
    (TRAIN.replace("{d}/m ", "{d}/pipe "), "pipe: a folder without config.json"),
    (SD.replace("{d}/pipe", "{d}/missing"), "cannot load the pipeline"),
    (SD.replace("{d}/pipe", "{d}/m"), "no file named model_index.json"),
    (SD.replace("{d}/images", "{d}/missing"), "missing: no such image folder"),
    (SD.replace("{d}/images", "{d}/noimages"), "noimages holds no images"),
    (SD + " --r 0", "LoraConfig.r must be a positive integer, got 0"),
    (SD + " --mode bogus", "argument --mode: invalid choice: 'bogus'"),
    (SD + " --targets nonexistent", "targets entry 'nonexistent' matches no module"),
    (SD + " --resolution 0", "SDTrainConfig.resolution (--resolution) must be more than 0, got 0"),
    ("train-sd --config {d}/unknown.yaml", "unknown.yaml: unknown key 'modle'"),
    ("generate --prompt hi", "give --model, or an adapter whose file records its base model"),
    ("generate --adapter {d}/missing.safetensors --prompt hi", "missing.safetensors: no such file"),
    ("generate --model {d}/m --adapter {d}/small.safetensors --prompt a", "small.safetensors was made for base model"),
    ("generate --model {d}/m --adapter {d}/corrupt.safetensors --prompt a", "not a readable safetensors file"),
    ("generate --model {d}/m --adapter {d}/m.safetensors", "give --prompt TEXT, or --chat"),
    ("generate --model {d}/m --prompt a --max-new-tokens -1", "--max-new-tokens: must be a positive integer, got -1"),
    ("generate --model {d}/m --prompt a --max-new-tokens abc", "--max-new-tokens: invalid positive value: 'abc'"),
    ("generate --model {d}/m --prompt a --num-beams 0", "--num-beams: must be a positive integer, got 0"),
    ("generate --model {d}/m --prompt a --device gpu7", "--device 'gpu7' is not a device"),
    ("generate-image --prompt a", "give --model, or an adapter whose file records its base model"),
    ("generate-image --model {d}/missing --prompt a", "cannot load the pipeline"),
    ("generate-image --model {d}/pipe --lora {d}/corrupt.safetensors --prompt a", "not a readable safetensors file"),
    ("generate-image --model {d}/pipe --lora {d}/small.safetensors --prompt a", "small.safetensors was made for base"),
    ("generate-image --model {d}/pipe --prompt 'a <lora:nope:1>' --lora-dir {d}", "no LoRA named 'nope'"),
    ("generate-image --model {d}/pipe --prompt 'a <lora:x:one>'", "prompt tag <lora:x:one>: weights must be numbers"),
    ("generate-image --model {d}/pipe --prompt a --steps 0", "--steps: must be a positive integer, got 0"),
    ("generate-image --model {d}/pipe --prompt a --count 0", "--count: must be a positive integer, got 0"),
    ("generate-image --model {d}/pipe --prompt a --steps 1 --count 1 --size 12", "have to be divisible by 8"),
    ("generate-image --model {d}/pipe --prompt a --trigger nope", "--trigger 'nope': write NAME=WORD"),
    ("generate-image --model {d}/pipe --prompt a --steps 1 --count 1 --size 8 --out {d}", "is a folder; give the .png"),
    ("combine {d}/missing.safetensors --out {d}/c.safetensors", "missing.safetensors: no such file"),
    ("combine {d}/m.safetensors {d}/small.safetensors --out {d}/c.safetensors", "made for different base models"),
    ("combine {d}/m.safetensors {d}/m.safetensors --method svd --rank 0 --out {d}/c.safetensors",
     "--rank must be a positive integer, got 0"),
    ("combine {d}/m.safetensors {d}/m.safetensors --method ties --density 1.5 --out {d}/c.safetensors",
     "--method ties needs --density in (0, 1]"),
    ("combine {d}/m.safetensors {d}/m.safetensors --method svd --dynamic bogus=1 --out {d}/c.safetensors",
     "dynamic rank rule 'bogus=1'"),
    ("combine {d}/empty.safetensors {d}/m.safetensors --out {d}/c.safetensors", "not a readable safetensors file"),
    ("resize {d}/m.safetensors --rank 0 --out {d}/r.safetensors", "--rank must be a positive integer, got 0"),
    ("resize {d}/m.safetensors --rank -1 --out {d}/r.safetensors", "--rank must be a positive integer, got -1"),
    ("resize {d}/m.safetensors --out {d}/r.safetensors", "resize needs --rank K or --dynamic RULE"),
    ("resize {d}/m.safetensors --dynamic energy=2 --out {d}/r.safetensors", "energy must be in (0, 1]"),
    ("resize {d}/m.safetensors --rank 1 --clamp-quantile 1.5 --out {d}/r.safetensors", "clamp quantile must be in"),
    ("extract --base {d}/missing --tuned {d}/m --rank 2 --out {d}/e.safetensors", "missing' is not a folder"),
    ("extract --base {d}/m --tuned {d}/small --rank 2 --out {d}/e.safetensors", "two models of the same architecture"),
    ("extract --base {d}/m --tuned {d}/tuned --rank 0 --out {d}/e.safetensors", "--rank must be a positive integer"),
    ("extract --base {d}/m --tuned {d}/m --rank 2 --out {d}/e.safetensors", "weights are identical"),
    ("extract --base {d}/m --tuned {d}/tuned --rank 2 --targets nope --out {d}/e.safetensors",
     "targets entry 'nope' matches no module"),
    ("serve --model {d}/m --adapter {d}/m.safetensors", "m.safetensors': write NAME=PATH"),
    ("serve --model {d}/m --adapter a={d}/missing.safetensors", "missing.safetensors: no such file or folder"),
    ("serve --model {d}/m --adapter-dir {d}/missing", "missing: no such folder"),
    ("serve --model {d}/m --adapter a={d}/small.safetensors", "small.safetensors was made for base model"),
    ("serve --model {d}/m --adapter a={d}/corrupt.safetensors", "not a readable safetensors file"),
    ("serve --model {d}/m --max-batch 0", "--max-batch: must be a positive integer, got 0"),
    ("serve --model {d}/m --port http", "argument --port: invalid int value: 'http'"),
    ("serve", "give --model, or an adapter whose file records its base model"),
    ("merge-into --adapter {d}/missing.safetensors --out {d}/merged", "missing.safetensors: no such file"),
    ("merge-into --model {d}/m --adapter {d}/small.safetensors --out {d}/merged", "was made for base model"),
    ("merge-into --model {d}/m --adapter {d}/m.safetensors --out {d}/m", "exists; give a new folder"),
    ("merge-into --adapter {d}/corrupt.safetensors --out {d}/merged", "not a readable safetensors file"),
    ("analyze {d}/missing.safetensors --out {d}/an", "missing.safetensors: no such file"),
    ("analyze {d}/m.safetensors --vs {d}/corrupt.safetensors --out {d}/an", "not a readable safetensors file"),
    ("analyze {d}/m.safetensors --base {d}/small --out {d}/an", "is this the base the adapter was trained on"),
    ("analyze {d}/m.safetensors --vs {d}/small.safetensors --out {d}/an", "the two A's have widths 16 and 8"),
    ("analyze {d}/m.safetensors --out {d}/m.safetensors", "m.safetensors is a file; give a folder"),
    ("analyze {d}/peft_latin1 --out {d}/an", "not valid JSON ('utf-8' codec can't decode"),
]
# run as `python -m lorakit.cli` with HF_HUB_OFFLINE=1: hub ids that cannot be fetched, and a file error
AS_PROCESS = [
    (TRAIN.replace("{d}/m ", "nobody/no-such-model "), "'nobody/no-such-model'"),
    ("generate --model nobody/no-such-model --prompt hi", "'nobody/no-such-model'"),
    ("generate-image --model nobody/no-such-pipe --prompt a", "cannot load the pipeline 'nobody/no-such-pipe'"),
    ("merge-into --model nobody/no-such-model --adapter {d}/m.safetensors --out {d}/merged",
     "'nobody/no-such-model'"),
    ("inspect {d}/corrupt.safetensors", "corrupt.safetensors: not a readable safetensors file"),
    ("generate --adapter nobody/no-such-lora --prompt hi", "nobody/no-such-lora: not in the Hugging Face cache"),
    ("serve --adapter x=nobody/no-such-lora@v2", "nobody/no-such-lora@v2: not in the Hugging Face cache"),
    ("combine {d}/m.safetensors nobody/lora:style.safetensors:0.5 --out {d}/c.safetensors",
     "nobody/lora:style.safetensors: not in the Hugging Face cache"),
    (TRAIN.replace("{d}/data.jsonl", "nobody/no-such-data:test"), "nobody/no-such-data:test: not in the hub cache"),
    ("push {d}/pushrun --repo a/b", "HF_HUB_OFFLINE is set, so nothing can be uploaded"),
]
BAD_INVOCATIONS = len(IN_PROCESS) + len(AS_PROCESS)  # the count the README gives


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Models, adapters and broken files for the table: m (tiny Llama) and m.safetensors on it; small, a Llama of
    another width, and its adapter; tuned (m with one weight changed); pipe (tiny SD) and images; bad files."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
    from PIL import Image
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorakit.llm import pretrained

    d = tmp_path_factory.mktemp("ws")
    _save_tiny(d / "m")
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(d / "small")
    PreTrainedTokenizerFast.from_pretrained(d / "m").save_pretrained(d / "small")
    for name in ("m", "small"):
        model, _, _ = pretrained.load(str(d / name))
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"], init=False), name="x")
        lorakit.save(model, d / f"{name}.safetensors", base_model=str(d / name))
    tuned, _, _ = pretrained.load(str(d / "m"))
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    tuned.save_pretrained(d / "tuned")
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)
    StableDiffusionPipeline(vae=vae, text_encoder=tiny_clip(), tokenizer=clip_tokenizer(d / "tok"), unet=tiny_unet(),
                            scheduler=DPMSolverMultistepScheduler(steps_offset=1), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(d / "pipe")
    for folder in ("images", "noimages", "nolora", "peft_badjson", "peft_latin1"):
        (d / folder).mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(d / "images" / f"{i}.png")
    (d / "images" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a dog"}) + "\n"
                                                         for i in range(2)))
    for folder, text in (("peft_badjson", b"{not json"), ("peft_latin1", b'{"r": "\xe9"}')):
        (d / folder / "adapter_config.json").write_bytes(text)
        (d / folder / "adapter_model.safetensors").write_bytes((d / "m.safetensors").read_bytes())
    files = {"empty.safetensors": b"", "corrupt.safetensors": b"\x10" + bytes(7) + b'{"a": garbage' + bytes(range(256)),
             "x.bin": b"PK\x03\x04", "data.xlsx": b"PK\x03\x04", "data.jsonl": b'{"text": "a b c a b"}\n' * 8,
             "empty.jsonl": b"",
             "broken.jsonl": b'{"text": "a b"}\n{"text": \n', "latin1.jsonl": b'{"text": "caf\xe9"}\n',
             "latin1.yaml": b"model: caf\xe9\n", "unknown.yaml": b"modle: x\n", "list.yaml": b"- a\n- b\n",
             "broken.yaml": b"model: [x\n"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "pushrun").mkdir()  # a run folder push takes
    (d / "pushrun" / "adapter.safetensors").write_bytes((d / "m.safetensors").read_bytes())
    return d


def test_the_table_is_large_and_the_readme_states_its_size():
    assert BAD_INVOCATIONS >= 30
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert f"held to that by {BAD_INVOCATIONS} bad invocations" in readme


def check_one_error_line(code: int, err: str, fragment: str):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lorakit: error:")]
    assert len(lines) == 1 and fragment in lines[0], err


@pytest.mark.parametrize("line, fragment", IN_PROCESS, ids=[c.split(" --out")[0][:70] for c, _ in IN_PROCESS])
def test_a_bad_invocation_is_one_error_line(ws, line, fragment, capsys, monkeypatch):
    monkeypatch.chdir(ws)  # generate-image writes images.png here when it (wrongly) succeeds
    capsys.readouterr()
    code = main(shlex.split(line.format(d=ws)))
    check_one_error_line(code, capsys.readouterr().err, fragment)


@pytest.mark.parametrize("line, fragment", AS_PROCESS, ids=[c.split(" --")[0][:60] for c, _ in AS_PROCESS])
def test_a_bad_invocation_in_a_real_process(ws, line, fragment):
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", *shlex.split(line.format(d=ws))], cwd=ws,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    check_one_error_line(proc.returncode, proc.stderr, fragment)
