"""`lorakit train` on data read through `datasets`: parquet/Arrow/JSON files, save_to_disk folders, hub ids from the
hub cache (offline), field mapping, memory-mapped token rows, bad rows, and streaming with exact resume."""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_adapter, killed_at

from lorakit import LoraError
from lorakit.cli import main
from lorakit.llm import data as datalib
from lorakit.llm.train import TrainConfig, Trainer, train
from lorakit.options import build

datasets = pytest.importorskip("datasets")  # lorakit[hub]

TEXTS = [{"text": " ".join("abc"[(i + k) % 3] for k in range(3 + i % 5))} for i in range(24)]
CLASSES = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})


@pytest.fixture
def tmp(tmp_path, monkeypatch, save_tiny):
    """TMP/m (the tiny model), TMP/train.jsonl (TEXTS); every cache in TMP, the hub offline (no network)."""
    import huggingface_hub.constants as hub

    caches = {"HF_HOME": tmp_path / "hf", "HF_HUB_CACHE": tmp_path / "hf" / "hub", "LORAKIT_CACHE": tmp_path / "lk",
              "HF_DATASETS_CACHE": tmp_path / "hf" / "datasets"}
    for k, v in {**caches, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # both libraries read these once, at import
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(caches["HF_HUB_CACHE"]))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", caches["HF_DATASETS_CACHE"])
    # a stream's end waits 5 s for Arrow's threads (apache/arrow#45214); the tests end streams often
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    save_tiny(tmp_path / "m")
    write_jsonl(tmp_path / "train.jsonl", TEXTS)
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp, **kw):
    base = {"model": str(tmp / "m"), "data": str(tmp / "train.jsonl"), "out": str(tmp / "run"), "targets": "all-linear",
            "r": 4, "alpha": 8, "lr": 1e-2, "max_steps": 2, "batch_size": 4, "dropout": 0.0, "seed": 3}
    return build(TrainConfig, {**base, **kw})


def rows_of(trainer_rows):
    return [dict(trainer_rows[i]) for i in range(len(trainer_rows))]


def hub_dataset(tmp, repo_id: str, splits: dict, card: str | None = None):
    """`repo_id` in the hub cache as huggingface_hub lays it out: refs/main, snapshots/COMMIT/data/SPLIT-*.parquet
    (a split named "config/split" goes to snapshots/COMMIT/config/split-*.parquet), and README.md `card`."""
    repo = tmp / "hf" / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for split, ds in splits.items():
        file = repo / "snapshots" / commit / ("" if "/" in split else "data") / f"{split}-00000-of-00001.parquet"
        file.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(file))
    if card:
        (repo / "snapshots" / commit / "README.md").write_text(card)


def test_parquet_arrow_and_json_give_the_rows_jsonl_gives_memory_mapped(tmp):
    ds = datasets.Dataset.from_list(TEXTS)
    ds.to_parquet(str(tmp / "train.parquet"))
    ds.to_json(str(tmp / "train.json"))  # JSON lines
    (tmp / "array.json").write_text(json.dumps(TEXTS))  # a JSON array
    ds.save_to_disk(str(tmp / "saved"))
    arrow = next(Path(tmp / "saved").glob("*.arrow"))
    want = rows_of(Trainer(config(tmp)).rows)
    for name in ("train.parquet", "train.json", "array.json", str(arrow)):
        rows = Trainer(config(tmp, data=str(tmp / name))).rows
        assert isinstance(rows, datasets.Dataset), name  # Arrow on disk, not a list of examples
        assert all(Path(f["filename"]).is_relative_to(tmp / "lk") for f in rows.cache_files)  # lorakit's cache
        assert rows_of(rows) == want, name


def test_training_on_parquet_gives_the_adapter_jsonl_gives(tmp):
    datasets.Dataset.from_list(TEXTS).to_parquet(str(tmp / "train.parquet"))
    train(config(tmp, out=str(tmp / "jsonl")))
    assert main(["train", "--model", str(tmp / "m"), "--data", str(tmp / "train.parquet"), "--out", str(tmp / "pq"),
                 "--targets", "all-linear", "--r", "4", "--alpha", "8", "--lr", "0.01", "--max-steps", "2",
                 "--batch-size", "4", "--dropout", "0", "--seed", "3", "--eval-data", str(tmp / "train.parquet")]) == 0
    assert_same_adapter(tmp / "jsonl" / "adapter.safetensors", tmp / "pq" / "adapter.safetensors")


def test_save_to_disk_folders_and_their_splits(tmp):
    train_ds, test_ds = datasets.Dataset.from_list(TEXTS[:16]), datasets.Dataset.from_list(TEXTS[16:])
    train_ds.save_to_disk(str(tmp / "one"))
    datasets.DatasetDict({"train": train_ds, "test": test_ds}).save_to_disk(str(tmp / "dict"))
    write_jsonl(tmp / "head.jsonl", TEXTS[:16])
    write_jsonl(tmp / "tail.jsonl", TEXTS[16:])
    head, tail = (rows_of(Trainer(config(tmp, data=str(tmp / n))).rows) for n in ("head.jsonl", "tail.jsonl"))
    assert rows_of(Trainer(config(tmp, data=str(tmp / "one"))).rows) == head
    t = Trainer(config(tmp, data=str(tmp / "dict"), eval_data=str(tmp / "dict")))  # train, and test for eval
    assert (rows_of(t.rows), rows_of(t.eval_rows)) == (head, tail)
    assert rows_of(Trainer(config(tmp, data=f"{tmp / 'dict'}:test")).rows) == tail
    assert not list((tmp / "dict").rglob("cache-*"))  # nothing written into the user's folder
    with pytest.raises(LoraError, match=r"dict:valid: no split 'valid'; it has 'train', 'test'; name one as .*:SPLIT"):
        Trainer(config(tmp, data=f"{tmp / 'dict'}:valid"))
    with pytest.raises(LoraError, match="holds one Dataset, no splits"):
        Trainer(config(tmp, data=f"{tmp / 'one'}:test"))


def test_field_mapping_renames_columns_of_every_source(tmp):
    pc = [{"instruction": f"a {'b' * (i % 3 + 1)}".replace("bb", "b b"), "output": " c a", "id": i} for i in range(8)]
    datasets.Dataset.from_list(pc).to_parquet(str(tmp / "pc.parquet"))
    write_jsonl(tmp / "pc.jsonl", pc)
    write_jsonl(tmp / "plain.jsonl", [{"prompt": r["instruction"], "completion": r["output"]} for r in pc])
    (tmp / "pc.csv").write_text("id,instruction,output\n" + "".join(f"{r['id']},{r['instruction']},{r['output']}\n"
                                                                     for r in pc))
    want = rows_of(Trainer(config(tmp, data=str(tmp / "plain.jsonl"))).rows)
    mapped = {"prompt_field": "instruction", "completion_field": "output"}
    for name in ("pc.parquet", "pc.jsonl", "pc.csv"):
        assert rows_of(Trainer(config(tmp, data=str(tmp / name), **mapped)).rows) == want, name
    with pytest.raises(LoraError, match=r"pc.parquet: no column 'prompt' \(--prompt-field\); its columns are "
                                        "instruction, output, id"):
        Trainer(config(tmp, data=str(tmp / "pc.parquet"), prompt_field="prompt", completion_field="output"))
    with pytest.raises(LoraError, match=r"pc.jsonl:1: no field 'input' \(--prompt-field\); it has 'instruction', "):
        Trainer(config(tmp, data=str(tmp / "pc.jsonl"), prompt_field="input", completion_field="output"))
    with pytest.raises(LoraError, match=r"pc.parquet: its columns instruction, output, id hold no example shape.*"
                                        "--text-field sentence"):
        Trainer(config(tmp, data=str(tmp / "pc.parquet")))


def test_hub_id_from_the_hub_cache_offline_classifies_with_classlabel_names(tmp, capsys, monkeypatch):
    rows = [{"sentence": "a a b" if i % 2 else "c c b", "label": i % 2, "idx": i} for i in range(16)]
    features = datasets.Features({**CLASSES, "idx": datasets.Value("int32")})
    hub_dataset(tmp, "user/sst", {"train": datasets.Dataset.from_list(rows, features=features),
                                  "validation": datasets.Dataset.from_list(rows[:6], features=features)})
    t = Trainer(config(tmp, data="user/sst", eval_data="user/sst", task="classify", targets=["q_proj", "v_proj"],
                       text_field="sentence", label_field="label"))
    assert t.labels == ["neg", "pos"] and len(t.rows) == 16 and len(t.eval_rows) == 6  # validation for eval
    assert rows_of(t.rows)[:2] == [{"input_ids": [4, 4, 3], "label": 0}, {"input_ids": [2, 2, 3], "label": 1}]
    assert "ignoring columns idx" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp / "m"), "--data", "user/sst:train", "--eval-data", "user/sst", "--out",
                 str(tmp / "cli"), "--task", "classify", "--text-field", "sentence", "--label-field", "label",
                 "--targets", "q_proj,v_proj", "--max-steps", "2", "--batch-size", "4"]) == 0
    assert (tmp / "cli" / "adapter.safetensors").exists()
    with pytest.raises(LoraError, match="user/sst:test: no split 'test'; it has 'train', 'validation'"):
        Trainer(config(tmp, data="user/sst:test", text_field="sentence"))
    datasets.Dataset.from_list(TEXTS[:5]).save_to_disk(str(tmp / "user" / "sst"))
    monkeypatch.chdir(tmp)
    assert len(Trainer(config(tmp, data="user/sst")).rows) == 5  # a local path wins over the hub id
    capsys.readouterr()
    assert main(["train", "--model", str(tmp / "m"), "--data", "someone/missing", "--out", str(tmp / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit: error: someone/missing: not in the hub cache") and "HF_HUB_OFFLINE" in err
    assert "\n" not in err


def test_a_hub_dataset_of_several_configurations_takes_owner_name_config(tmp):
    card = ("---\nconfigs:\n" + "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n"
                                         for c in ("one", "two")) + "---\n")
    hub_dataset(tmp, "user/glue", {"one/train": datasets.Dataset.from_list(TEXTS[:6]),
                                   "two/train": datasets.Dataset.from_list(TEXTS[:10])}, card)
    assert len(Trainer(config(tmp, data="user/glue/two:train")).rows) == 10
    assert len(Trainer(config(tmp, data="user/glue/one")).rows) == 6
    with pytest.raises(LoraError, match=r"user/glue: the data set has several configurations \(\['one', 'two'\]"):
        Trainer(config(tmp, data="user/glue"))


def test_bad_rows_fail_with_the_row_or_are_skipped_and_counted(tmp):
    bad = [*TEXTS[:3], {"text": " "}, *TEXTS[3:]]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp / "bad.parquet"))
    with pytest.raises(LoraError, match=r"bad.parquet row 3: 'text' is empty; fill it in"):
        Trainer(config(tmp, data=str(tmp / "bad.parquet")))
    t = Trainer(config(tmp, data=str(tmp / "bad.parquet"), skip_bad=True))
    assert t.skipped == 1 and rows_of(t.rows) == rows_of(Trainer(config(tmp)).rows)
    labels = datasets.Dataset.from_list([{"text": "a b", "label": 1}, {"text": "c", "label": -1}])
    labels.to_parquet(str(tmp / "labels.parquet"))
    with pytest.raises(LoraError, match=r"row 1: label -1 is not among the 2 classes \['0', '1'\]"):
        Trainer(config(tmp, data=str(tmp / "labels.parquet"), task="classify"))


def test_a_rerun_reads_the_tokenized_rows_from_the_cache(tmp, monkeypatch):
    datasets.Dataset.from_list(TEXTS).to_parquet(str(tmp / "train.parquet"))
    first = Trainer(config(tmp, data=str(tmp / "train.parquet"))).rows

    def fail(*a, **kw):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(datalib, "_encode_batch", fail)
    again = Trainer(config(tmp, data=str(tmp / "train.parquet"))).rows
    assert again.cache_files == first.cache_files and rows_of(again) == rows_of(first)
    with pytest.raises(AssertionError, match="tokenized again"):  # other settings: another key
        Trainer(config(tmp, data=str(tmp / "train.parquet"), max_length=3))


def test_streaming_takes_rows_in_order_epoch_after_epoch(tmp):
    from transformers import AutoTokenizer

    datasets.Dataset.from_list(TEXTS[:10]).to_parquet(str(tmp / "ten.parquet"))
    tok = AutoTokenizer.from_pretrained(tmp / "m")
    whole = datalib.encode_dataset(datalib.read_data(str(tmp / "ten.parquet"))[0], "x", "causal-lm", tok, 8)[0]
    stream = datalib.encode_dataset(datalib.read_data(str(tmp / "ten.parquet"), streaming=True)[0], "x", "causal-lm",
                                    tok, 8)[0]
    assert isinstance(stream, datalib.Stream)
    order = [whole[i % 10] for i in range(16)]
    assert [stream.batch(k, 4) for k in range(4)] == [order[4 * k: 4 * k + 4] for k in range(4)]
    state = datalib.Stream(stream.ds, stream.kw)
    state.load_state_dict({"epoch": 1, "offset": 2, "taken": 12})  # after step 2 (of 4 rows)
    assert state.batch(3, 4) == order[12:16] and stream.batch(1, 4) == order[4:8]  # and back: read again


def test_streaming_resume_after_a_kill_gives_the_identical_adapter(tmp):
    datasets.Dataset.from_list(TEXTS).to_parquet(str(tmp / "train.parquet"))
    kw = {"data": str(tmp / "train.parquet"), "streaming": True, "shuffle_buffer": 8, "max_steps": 8, "batch_size": 5}
    train(config(tmp, out=str(tmp / "whole"), **kw))  # 40 rows: the stream starts again (reshuffled) in step 5
    with killed_at(6):
        train(config(tmp, save_every=4, **kw))
    state = torch.load(tmp / "run" / "checkpoints" / "step-000004" / "state.pt", weights_only=True)["stream"]
    assert state == {"epoch": 0, "offset": 20, "taken": 20, "skipped": 0}  # where step 5 goes on
    train(config(tmp, save_every=4, resume=True, **kw))
    assert_same_adapter(tmp / "whole" / "adapter.safetensors", tmp / "run" / "adapter.safetensors")
    with pytest.raises(LoraError, match="holds a different run.*shuffle_buffer was 8, now 4"):
        train(config(tmp, save_every=4, resume=True, **{**kw, "shuffle_buffer": 4}))


def test_streaming_misuse_is_refused(tmp):
    with pytest.raises(LoraError, match="--streaming needs --max-steps"):
        config(tmp, streaming=True, max_steps=None)
    with pytest.raises(LoraError, match=r"--streaming reads .* not .csv files"):
        Trainer(config(tmp, data=str(tmp / "x.csv"), streaming=True))
    datasets.Dataset.from_list([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]).to_parquet(
        str(tmp / "cls.parquet"))
    with pytest.raises(LoraError, match="classifying a stream needs the class names up front, as a ClassLabel"):
        Trainer(config(tmp, data=str(tmp / "cls.parquet"), streaming=True, task="classify"))


def test_without_datasets_the_error_says_what_to_install(tmp, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(LoraError, match=r"needs the `datasets` library; pip install 'lorakit\[hub\]'"):
        datalib.read_data("user/name")
    assert datalib.read_data(str(tmp / "train.jsonl"))[0] == TEXTS  # the line formats need no datasets
