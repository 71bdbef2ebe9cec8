"""Issue 11 (reliability) on the LLM side: extra data fields, classification heads vs all-linear, the recorded base
model of the embedded defaults, and unreachable hub ids."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from lorakit import LoraError
from lorakit.llm.data import read_examples
from lorakit.llm.train import TrainConfig, train
from lorakit.options import build


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp, model, data, **kw):
    base = dict(model=str(model), data=str(data), out=str(tmp / "run"), r=4, alpha=8, lr=1e-2, max_steps=2,
                batch_size=4, seed=3)
    return build(TrainConfig, {**base, **kw})


# --- 1. extra fields --------------------------------------------------------------------------------
def test_extra_jsonl_fields_are_ignored_with_one_notice(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [{"id": i, "text": "a b", "source": "web"} for i in range(3)]
                       + [{"text": "c", "references": ["x"]}])
    assert read_examples(path) == ([{"text": "a b"}] * 3 + [{"text": "c"}], 0)
    err = capsys.readouterr().err
    assert err.count("ignoring fields") == 1 and f"{path}: ignoring fields id, references, source" in err


def test_extra_csv_columns_are_ignored_with_one_notice(tmp_path, capsys):
    path = tmp_path / "data.csv"
    path.write_text("id,text,label,source\n1,a b,1,web\n2,c,0,web\n")
    assert read_examples(path)[0] == [{"text": "a b", "label": 1}, {"text": "c", "label": 0}]
    assert capsys.readouterr().err.count(f"{path}: ignoring fields id, source") == 1


def test_strict_fields_refuses_extra_fields_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b", "id": 2}])
    with pytest.raises(LoraError, match=f"^{path}:2: field 'id' is not part of an example.*--strict-fields"):
        read_examples(path, strict_fields=True)
    tsv = tmp_path / "data.tsv"
    tsv.write_text("text\tlabel\tid\na\t1\t7\n")
    with pytest.raises(LoraError, match=f"^{tsv}:1: the columns \\['id'\\] are not part of an example"):
        read_examples(tsv, strict_fields=True)


def test_train_ignores_extra_fields_unless_strict_fields(tmp_path, save_tiny, capsys):
    from lorakit.cli import main

    save_tiny(tmp_path / "m")
    data = write_jsonl(tmp_path / "data.jsonl", [{"id": i, "text": "a b c a b"} for i in range(8)])
    args = ["train", "--model", str(tmp_path / "m"), "--data", str(data), "--max-steps", "1", "--batch-size", "4",
            "--targets", "q_proj"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().err.count("ignoring fields id") == 1
    assert main([*args, "--out", str(tmp_path / "strict"), "--strict-fields"]) == 2
    assert f"{data}:1: field 'id' is not part of an example" in capsys.readouterr().err


# --- 2. classification heads are not LoRA targets ---------------------------------------------------------------
def test_bert_classification_with_all_linear_trains_pooler_and_head_in_full(tmp_path, save_tiny):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    BertForSequenceClassification(BertConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2)).save_pretrained(tmp_path / "bert")
    PreTrainedTokenizerFast.from_pretrained(save_tiny(tmp_path / "m")).save_pretrained(tmp_path / "bert")
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": "a a b" if i % 2 else "c c b", "label": i % 2}
                                                for i in range(16)])
    train(config(tmp_path, tmp_path / "bert", data, task="classify", targets="all-linear", exclude=["key"]))
    keys = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    saved = {k.rsplit(".", 1)[0] for k in keys if k.startswith("saved.")}
    lora = {k[len("lora."):].rsplit(".", 1)[0] for k in keys if k.startswith("lora.")}
    assert saved == {"saved.classifier", "saved.bert.pooler.dense"}
    assert not any("pooler" in k or "classifier" in k or "key" in k for k in lora)
    assert len(lora) == 5 and "bert.encoder.layer.0.attention.self.query" in lora


def test_keep_out_checks_the_users_exclude_entries(tmp_path, save_tiny):
    from transformers import AutoModelForCausalLM

    from lorakit.core.targeting import keep_out

    model = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "m"))
    with pytest.raises(LoraError, match="exclude entry 'q_prj' matches no module"):
        keep_out(model, ["q_prj"], ["lm_head"])
    assert keep_out(model, None, []) is None and keep_out(model, ["q_proj"], []) == ["q_proj"]


# --- 3. the embedded defaults are recorded by their hub id --------------------------------------------------------
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_adapters_on_an_embedded_default_record_its_hub_id_which_finds_it_again(tmp_path, save_tiny, monkeypatch):
    from lorakit.formats.io import read
    from lorakit.llm import pretrained
    from lorakit.llm.generate import load_model

    folder = save_tiny(tmp_path / "m")
    monkeypatch.setattr(pretrained, "embedded_path", lambda name: folder)  # stands in for the installed package
    assert pretrained.hub_id("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b c"}] * 8)
    train(config(tmp_path, "smollm2-135m", data, targets=["q_proj"]))
    adapter = tmp_path / "run" / "adapter.safetensors"
    assert read(adapter)[0].base_model == SMOL
    card = (tmp_path / "run" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == SMOL and f"of `{SMOL}` trained" in card
    assert pretrained.resolve(SMOL) == folder  # the recorded id loads the embedded copy, no network needed
    model, _ = load_model(None, [str(adapter)])
    assert type(model).__name__ == "LlamaForCausalLM"


def test_the_hub_id_of_an_uninstalled_embedded_default_stays_a_hub_id(monkeypatch):
    from lorakit.llm import pretrained

    def missing(name):
        raise LoraError(f"model {name!r} comes from a package that is not installed")

    monkeypatch.setattr(pretrained, "embedded_path", missing)
    assert pretrained.resolve(SMOL) == SMOL
    with pytest.raises(LoraError, match="not installed"):
        pretrained.resolve("smollm2-135m")


# --- 4. an unreachable hub id ------------------------------------------------------------------------------------
def test_an_unreachable_hub_id_is_one_error_line_not_a_traceback(tmp_path):
    data = write_jsonl(tmp_path / "x.jsonl", [{"text": "a b"}])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--model", "nobody/nothing", "--data",
                           str(data), "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("lorakit: error:")]
    assert len(lines) == 1 and "'nobody/nothing'" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert "check the hub id, or the path" in lines[0]
