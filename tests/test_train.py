"""`lorakit train`: outputs, model card, exact resume, 2-process DDP == 1 process, classification."""

import json

import pytest
import torch
import yaml
from conftest import assert_same_adapter, killed_at, launch_two
from safetensors.torch import load_file

from lorakit import LoraError
from lorakit.cli import main
from lorakit.llm.train import TrainConfig, train
from lorakit.options import build


@pytest.fixture
def setup(tmp_path, save_tiny):
    save_tiny(tmp_path / "m")
    lines = [{"text": " ".join("abc"[(i + k) % 3] for k in range(9))} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path


def config(tmp, **kw):
    base = dict(model=str(tmp / "m"), data=str(tmp / "train.jsonl"), out=str(tmp / "run"), targets="all-linear",
                r=4, alpha=8, lr=1e-2, max_steps=12, batch_size=4, dropout=0.1, seed=3)
    return build(TrainConfig, {**base, **kw})


def test_training_writes_adapter_metrics_curve_and_card(setup):
    result = train(config(setup, eval_data=str(setup / "train.jsonl"), eval_every=6))
    run = setup / "run"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.1  # it learns
    assert {"lr", "tokens_per_s", "step_s"} <= set(metrics[0]) and "eval_ppl" in metrics[5]
    assert 0 < result["seconds_per_step"] < 10
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    front = yaml.safe_load((run / "README.md").read_text().split("---")[1])
    assert front["library_name"] == "lorakit" and "base_model" not in front  # a local folder is no hub id
    assert (front["r"], front["alpha"], front["targets"], front["steps"]) == (4, 8, "all-linear", 12)
    assert front["training_data"]["name"] == "train.jsonl" and str(setup) not in (run / "README.md").read_text()
    assert front["model-index"][0]["results"][0]["metrics"][0] == {"type": "loss", "value": result["eval_loss"]}
    assert result["adapter_bytes"] == (run / "adapter.safetensors").stat().st_size < 20_000


def test_resume_after_a_kill_gives_the_identical_adapter(setup):
    train(config(setup, out=str(setup / "whole")))
    want = load_file(str(setup / "whole" / "adapter.safetensors"))
    with killed_at(8):
        train(config(setup, save_every=5))
    assert [p.name for p in (setup / "run" / "checkpoints").iterdir()] == ["step-000005"]
    train(config(setup, save_every=5, resume=True))
    got = load_file(str(setup / "run" / "adapter.safetensors"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    steps = [json.loads(x)["step"] for x in (setup / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_two_processes_equal_one_with_the_same_global_batch(setup):
    one = config(setup, out=str(setup / "one"), batch_size=4, dropout=0.0)
    train(one)
    args = ["--model", one.model, "--data", one.data, "--out", str(setup / "two"), "--targets", "all-linear",
            "--r", "4", "--alpha", "8", "--lr", "0.01", "--max-steps", "12", "--batch-size", "2",
            "--dropout", "0", "--seed", "3"]
    launch_two("train", args)
    assert_same_adapter(setup / "one" / "adapter.safetensors", setup / "two" / "adapter.safetensors")


def test_classification_trains_the_head_and_reports_accuracy(setup):
    rows = [{"text": "a a a b" if i % 2 else "c c c b", "label": "yes" if i % 2 else "no"} for i in range(32)]
    (setup / "cls.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    result = train(config(setup, task="classify", data=str(setup / "cls.jsonl"), eval_data=str(setup / "cls.jsonl"),
                          targets=["q_proj", "v_proj"], max_steps=15))
    assert result["eval_accuracy"] == 1.0
    front = yaml.safe_load((setup / "run" / "README.md").read_text().split("---")[1])
    assert front["labels"] == ["no", "yes"]
    assert any(k.startswith("saved.score.") for k in load_file(str(setup / "run" / "adapter.safetensors")))


def test_bert_classification_trains_the_pooler_with_the_head(setup):
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    BertModel(BertConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)).save_pretrained(setup / "bert")
    PreTrainedTokenizerFast.from_pretrained(setup / "m").save_pretrained(setup / "bert")
    rows = [{"text": "a a b" if i % 2 else "c c b", "label": i % 2} for i in range(16)]
    (setup / "cls.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    train(config(setup, model=str(setup / "bert"), task="classify", data=str(setup / "cls.jsonl"),
                 targets=["query", "value"], max_steps=2))
    saved = {k.rsplit(".", 1)[0] for k in load_file(str(setup / "run" / "adapter.safetensors")) if k.startswith("saved.")}
    assert saved == {"saved.classifier", "saved.bert.pooler.dense"}


def test_full_finetune_trains_every_weight(setup):
    result = train(config(setup, full_finetune=True, max_steps=2))
    assert result["trainable_params"] == result["total_params"]
    assert (setup / "run" / "model" / "config.json").exists()


def test_a_peft_model_trains_through_the_same_loop(setup):
    import peft

    adapt = lambda m: peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    result = train(config(setup, max_steps=4), adapt=adapt)
    saved = load_file(str(setup / "run" / "adapter" / "adapter_model.safetensors"))
    assert result["trainable_params"] == sum(t.numel() for t in saved.values()) > 0
    assert all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # B left zero: it trained


def test_cli_reads_a_yaml_config_and_flags_win(setup, capsys):
    cfg = {"model": str(setup / "m"), "data": str(setup / "train.jsonl"), "out": str(setup / "cli"), "r": 2,
           "max_steps": 3, "batch_size": 4, "targets": "q_proj,v_proj"}
    (setup / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(setup / "run.yaml"), "--r", "3"]) == 0
    front = yaml.safe_load((setup / "cli" / "README.md").read_text().split("---")[1])
    assert front["r"] == 3 and front["targets"] == ["q_proj", "v_proj"] and front["steps"] == 3
    (setup / "bad.yaml").write_text("modle: x\n")
    assert main(["train", "--config", str(setup / "bad.yaml")]) == 2
    assert "unknown key 'modle'" in capsys.readouterr().err


def test_bad_data_fails_with_file_and_line(setup):
    (setup / "bad.jsonl").write_text('{"text": "a b"}\n{"txt": "a"}\n')
    with pytest.raises(LoraError, match="bad.jsonl:2"):
        train(config(setup, data=str(setup / "bad.jsonl")))


def test_eval_reports_before_and_after_and_bleu(setup):
    rows = [{"prompt": "a b", "completion": " c a b c"}, {"prompt": "b c", "completion": " a b c a"}] * 8
    (setup / "pc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    result = train(config(setup, data=str(setup / "pc.jsonl"), eval_data=str(setup / "pc.jsonl"), eval_bleu=True,
                          max_length=12, max_steps=120, lr=3e-2, full_finetune=True))
    assert result["eval_loss"] < result["eval_loss_before"] - 0.5
    assert result["eval_bleu_before"] < 50 and result["eval_bleu"] == pytest.approx(100)  # learned by heart


def test_gradient_checkpointing_trains_the_same_adapter(setup):
    train(config(setup, out=str(setup / "plain"), max_steps=4, dropout=0.0))
    train(config(setup, out=str(setup / "ckpt"), max_steps=4, dropout=0.0, gradient_checkpointing=True))
    a = load_file(str(setup / "plain" / "adapter.safetensors"))
    b = load_file(str(setup / "ckpt" / "adapter.safetensors"))
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


def test_bf16_autocast_trains_fp32_adapters(setup):
    """bf16 learns as fp32 does (eval loss 2.809 -> 2.622 in both, 3e-5 apart), yet autocast is on (not bit-equal),
    and the factors stay fp32."""
    runs = {p: train(config(setup, out=str(setup / p), precision=p, dropout=0.0, eval_data=str(setup / "train.jsonl")))
            for p in ("fp32", "bf16")}
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16["eval_loss"] < bf16["eval_loss_before"] - 0.15  # it learned
    assert 0 < abs(bf16["eval_loss"] - fp32["eval_loss"]) < 0.01
    assert {t.dtype for t in load_file(bf16["adapter"]).values()} == {__import__("torch").float32}


def test_lora_plus_trains_b_at_ratio_times_the_learning_rate(setup):
    """Adam's first step moves every parameter by ±lr; B starts at zero and A gets no gradient through it yet."""
    files = {}
    for ratio in (None, 16.0):
        out = setup / f"run-{ratio}"
        train(config(setup, out=str(out), max_steps=1, dropout=0.0, lora_plus_ratio=ratio))
        files[ratio] = load_file(str(out / "adapter.safetensors"))
    plain, plus = files[None], files[16.0]
    bs = [k for k in plain if k.endswith(".B")]
    assert bs and len(bs) == len([k for k in plain if k.endswith(".A")])
    for k in plain:
        if k.endswith(".B"):
            assert plain[k].abs().max().item() == pytest.approx(1e-2, rel=1e-3)
            assert plus[k].abs().max().item() == pytest.approx(16e-2, rel=1e-3)
        else:
            assert torch.equal(plain[k], plus[k])
    with pytest.raises(LoraError, match="needs LoRA factors"):
        train(config(setup, out=str(setup / "full"), max_steps=1, full_finetune=True, lora_plus_ratio=4.0))
    with pytest.raises(LoraError, match="--lora-plus-ratio\\) must be more than 0"):
        config(setup, lora_plus_ratio=-1.0)
