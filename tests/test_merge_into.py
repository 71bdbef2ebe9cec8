"""merge-into bakes adapters into a plain model folder; extract turns two models back into a LoRA; the burn-out
guard on live models (set_weights) and from the command line."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.core.errors import LoraError

CFG = lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"], init=False)


def adapter_file(folder, path, cfg=CFG, seed=0):
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    lorakit.inject(model, cfg)
    lorakit.save(model, path, base_model=str(folder))
    return path


def logits(model, ids=torch.tensor([[2, 3, 4, 2]])):
    with torch.no_grad():
        return model(ids).logits


def test_merge_into_writes_a_plain_model_equal_to_base_plus_adapters(tmp_path, save_tiny, capsys):
    folder = save_tiny(tmp_path / "base")
    a = adapter_file(folder, tmp_path / "a.safetensors", seed=0)
    b = adapter_file(folder, tmp_path / "b.safetensors", seed=1)
    assert main(["merge-into", "--adapter", f"{a}:0.7", "--adapter", f"{b}:-0.4", "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # base taken from the first adapter's header
    assert not any("lora" in k for k in merged.state_dict())
    assert (tmp_path / "m" / "tokenizer.json").exists()

    ref = AutoModelForCausalLM.from_pretrained(folder)
    lorakit.set_weights(ref, {lorakit.load(ref, a): 0.7, lorakit.load(ref, b): -0.4})
    torch.testing.assert_close(logits(merged), logits(ref), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(merged), logits(AutoModelForCausalLM.from_pretrained(folder)), atol=1e-3)


def test_merge_into_refuses_nan_and_an_existing_folder_and_writes_nothing(tmp_path, save_tiny, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = save_tiny(tmp_path / "base")
    a = adapter_file(folder, tmp_path / "a.safetensors")
    tensors = load_file(a)
    key = next(k for k in tensors if k.endswith(".A"))
    tensors[key][0, 0] = float("nan")
    with safe_open(str(a), "pt") as f:
        meta = f.metadata()
    save_file(tensors, tmp_path / "nan.safetensors", metadata=meta)
    capsys.readouterr()
    assert main(["merge-into", "--adapter", str(tmp_path / "nan.safetensors"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [e for e in err.splitlines() if e.startswith("lorakit: error:") and "NaN" in e]
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    assert main(["merge-into", "--adapter", str(a), "--out", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


def test_merge_into_a_pipeline_writes_a_pipeline_folder(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    tiny_sd.save_pretrained(tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    lorakit.inject(pipe, lorakit.LoraConfig(r=2, alpha=2, targets=["to_q", "to_v"], init=False))
    lorakit.save(pipe, tmp_path / "sd.safetensors", base_model=str(tmp_path / "pipe"))
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 16)
    with torch.no_grad():
        want = pipe.unet(x, t, ctx).sample
    assert main(["merge-into", "--adapter", str(tmp_path / "sd.safetensors"), "--out", str(tmp_path / "merged")]) == 0
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.unet.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged.unet(x, t, ctx).sample, want, atol=1e-5, rtol=1e-5)


def test_extract_from_two_model_folders_gives_back_a_low_rank_finetune(tmp_path, save_tiny, capsys):
    folder = save_tiny(tmp_path / "base")
    tuned = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in (tuned.model.layers[0].self_attn.q_proj, tuned.model.layers[0].mlp.up_proj):
            w = layer.weight
            w += 0.1 * torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1])  # a rank-2 change
    tuned.save_pretrained(tmp_path / "tuned")
    assert main(["extract", "--base", str(folder), "--tuned", str(tmp_path / "tuned"), "--rank", "2",
                 "--out", str(tmp_path / "x.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "100.0000%" in out
    a, _ = lorakit.read(tmp_path / "x.safetensors")
    assert sorted(a.modules) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]
    base = AutoModelForCausalLM.from_pretrained(folder)
    lorakit.load(base, tmp_path / "x.safetensors")
    torch.testing.assert_close(logits(base), logits(tuned), atol=1e-5, rtol=1e-5)


def two_identical_and_one_other(tmp_path, folder):
    """Adapter files a, a_copy (same tensors) and b (other modules' directions) on the tiny Llama."""
    a = adapter_file(folder, tmp_path / "a.safetensors", seed=0)
    (tmp_path / "a_copy.safetensors").write_bytes(a.read_bytes())
    return a, tmp_path / "a_copy.safetensors", adapter_file(folder, tmp_path / "b.safetensors", seed=1)


def test_guard_counts_a_direction_two_adapters_share_once(tmp_path, save_tiny):
    folder = save_tiny(tmp_path / "base")
    a, a2, _ = two_identical_and_one_other(tmp_path, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    n1, n2 = lorakit.load(model, a), lorakit.load(model, a2)
    lorakit.set_weights(model, {n1: 1.0})
    single = logits(model)
    lorakit.set_weights(model, {n1: 1.0, n2: 1.0})
    doubled = logits(model)
    lorakit.set_weights(model, {n1: 1.0, n2: 1.0}, guard="shared")
    torch.testing.assert_close(logits(model), single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(doubled, single, atol=1e-3)
    assert not any(p.requires_grad for p in model.parameters())  # guarded stacks are for inference
    lorakit.merge(model)  # merge and unmerge use the guarded update, and undo it exactly
    torch.testing.assert_close(logits(model), single, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    lorakit.set_weights(model, {n1: 1.0, n2: 1.0})  # without a guard: the plain sum again
    torch.testing.assert_close(logits(model), doubled)


@pytest.mark.parametrize("guard", ["spectral", "shared", "norm"])
def test_guard_leaves_a_single_adapter_and_non_overlapping_layers_alone(tmp_path, save_tiny, guard):
    folder = save_tiny(tmp_path / "base")
    a = adapter_file(folder, tmp_path / "a.safetensors", seed=0)
    b = adapter_file(folder, tmp_path / "b.safetensors", lorakit.LoraConfig(r=2, alpha=4, targets=["k_proj"],
                                                                               init=False), seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder)
    na, nb = lorakit.load(model, a), lorakit.load(model, b)
    lorakit.set_weights(model, {na: 0.8, nb: -1.0})
    plain = logits(model)
    lorakit.set_weights(model, {na: 0.8, nb: -1.0}, guard=guard)  # the two never meet in a layer
    torch.testing.assert_close(logits(model), plain)
    with pytest.raises(LoraError, match="unknown guard"):
        lorakit.set_weights(model, {na: 1.0}, guard="cap")


def test_guard_from_the_command_line_combine_and_generate(tmp_path, save_tiny, capsys):
    folder = save_tiny(tmp_path / "base")
    a, a2, _ = two_identical_and_one_other(tmp_path, folder)
    assert main(["combine", str(a), str(a2), "--guard", "shared", "--out", str(tmp_path / "g.safetensors")]) == 0
    model = AutoModelForCausalLM.from_pretrained(folder)
    lorakit.load(model, tmp_path / "g.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(folder)
    lorakit.load(ref, a)
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-5, rtol=1e-5)
    history = lorakit.read(tmp_path / "g.safetensors")[0].history
    assert history["method"] == "cat" and history["guard"] == "shared"
    assert [i["weight"] for i in history["inputs"]] == [1.0, 1.0]
    capsys.readouterr()
    assert main(["generate", "--adapter", str(a), "--adapter", str(a2), "--guard", "shared", "--prompt", "a b",
                 "--max-new-tokens", "3"]) == 0
    guarded = capsys.readouterr().out
    assert main(["generate", "--adapter", str(a), "--prompt", "a b", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == guarded


def test_extract_from_two_pipeline_folders_names_components(tmp_path, tiny_sd, capsys):
    tiny_sd.save_pretrained(tmp_path / "base")
    torch.manual_seed(4)
    q_proj = next(m for n, m in tiny_sd.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    with torch.no_grad():
        for w in (tiny_sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight, q_proj.weight):
            w += torch.randn(w.shape[0], 1) @ torch.randn(1, w.shape[1])  # rank-1 changes
    tiny_sd.save_pretrained(tmp_path / "tuned")
    assert main(["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "1",
                 "--out", str(tmp_path / "x.safetensors")]) == 0
    a, _ = lorakit.read(tmp_path / "x.safetensors")
    assert sorted(p.split(".")[0] for p in a.modules) == ["text_encoder", "unet"]
    assert any(p.endswith("attn2.to_k") for p in a.modules)


def test_prompt_routing_keeps_an_adapter_only_where_its_trigger_word_is():
    from lorakit.core.guard import route

    weights, triggers = {"eight": 1.0, "nine": 0.8, "style": 0.5}, {"eight": ["eight"], "nine": ["nine", "<d9>"]}
    assert route("a handwritten digit Eight", weights, triggers) == {"eight": 1.0, "style": 0.5}
    assert route("a <d9> please", weights, triggers) == {"nine": 0.8, "style": 0.5}
    assert route("eighteen ninety", weights, triggers) == {"style": 0.5}  # whole words only
    assert route("eight and nine", weights, triggers) == weights


def test_generate_image_routes_loras_by_trigger_words(tmp_path, tiny_sd):
    from lorakit.sd.generate import load_pipeline

    tiny_sd.save_pretrained(tmp_path / "pipe")
    for name, seed in (("eight", 0), ("nine", 1)):
        pipe, _ = load_pipeline(str(tmp_path / "pipe"), [], "x")
        torch.manual_seed(seed)
        lorakit.inject(pipe, lorakit.LoraConfig(r=2, alpha=2, targets=["to_q"], init=False))
        lorakit.save(pipe, tmp_path / f"{name}.safetensors", base_model=str(tmp_path / "pipe"))
    files = [str(tmp_path / "eight.safetensors"), str(tmp_path / "nine.safetensors") + ":0.5"]
    triggers = {"eight": ["eight"], "nine": ["nine"]}
    pipe, prompt = load_pipeline(None, files, "a digit eight", triggers=triggers)
    assert lorakit.active(pipe) == {"lora0": 1.0}
    pipe, _ = load_pipeline(None, files, "a digit nine", triggers=triggers)
    assert lorakit.active(pipe) == {"lora0": 0.5} and len(lorakit.adapters(pipe)) == 1
    assert main(["generate-image", *[a for f in files for a in ("--lora", f)], "--prompt", "x", "--trigger",
                 "seven=7", "--out", str(tmp_path / "g.png")]) == 2
