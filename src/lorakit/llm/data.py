"""Training data for `lorakit train`: read examples from a file, a folder or the hub, tokenize them with the loss
where it belongs, and pad them into batches.

Files, by suffix: .jsonl (one JSON object a line), .csv / .tsv (a header row naming the fields) and .txt (E2E NLG
lines, `meaning representation||reference`, read as prompt and completion). Every example in a file has one shape:

    {"prompt", "completion"}                     causal LM, loss on the completion only
    {"messages": [{"role", "content"}, ...]}     causal LM through the chat template, loss on assistant turns only
    {"text"}                                     causal LM, loss on every token
    {"text", "label"}                            classification; the label an int or a string

Other fields (`id`, `source`, ...; common in published data sets) are dropped with one notice per file, or refused
with strict_fields. A bad line is a LoraError naming FILE:LINE, what is wrong and how to fix it, before any training
starts (or, with skip_bad, it is skipped and counted): a run should neither die an hour in nor quietly learn from a
broken file.

Through the `datasets` library (pip install 'lorakit[hub]'), read_data also reads .parquet, .arrow and .json (JSON
lines or an array) files, folders written by Dataset/DatasetDict.save_to_disk (`folder:split`) and hub dataset ids
(`user/name` or `user/name:split`; the split defaults to train, or for eval data to validation, then test; offline,
from the hub cache). A local path always wins over the hub-id reading. Such a data set is never made a Python list:
Dataset.map checks and tokenizes it into a memory-mapped Dataset of token rows, cached in lorakit's cache dir; a bad
row is "SPEC row N: ...". With streaming, a Stream reads it in order and tokenizes as it goes (see Stream).

Field mapping (field_map, --text-field sentence, --prompt-field instruction, ...): a source's own column names are
renamed to lorakit's before the shape is checked, for every source, files included.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import sys
from pathlib import Path

import torch

from lorakit import dataset
from lorakit.core.errors import LoraError

IGNORE = -100  # the label that cross-entropy (and every transformers model) leaves out of the loss
SHAPES = {("completion", "prompt"): "prompt/completion", ("messages",): "messages", ("text",): "text",
          ("label", "text"): "text/label"}
FIELDS = {k for shape in SHAPES for k in shape}
MAPPABLE = ("text", "prompt", "completion", "messages", "label")  # config fields text_field, ...: a source's names
SHAPE_LIST = "{prompt, completion}, {messages}, {text} or {text, label}"
SUFFIXES = {".jsonl": "jsonl", ".csv": ",", ".tsv": "\t", ".txt": "e2e"}


class _Bad(Exception):
    """What is wrong with one example and how to fix it; read_examples adds FILE:LINE."""


# --- reading --------------------------------------------------------------------------------------
def read_examples(path, skip_bad: bool = False, strict_fields: bool = False,
                  fields: dict[str, str] | None = None) -> tuple[list[dict], int]:
    """(examples, number of bad lines skipped) of a .jsonl, .csv, .tsv or E2E .txt file; see the module docstring.

    A bad line raises LoraError "FILE:LINE: problem; fix", or is skipped and counted with skip_bad. Examples of
    different shapes in one file, and a file without a valid example, are errors either way. Fields outside the
    shapes are dropped with one notice on stderr, or are bad lines with strict_fields. `fields` ({source name:
    lorakit field}, see field_map) renames fields before all that."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LoraError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .csv, .tsv or .txt "
                        "(E2E lines 'meaning representation||reference')")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise LoraError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise LoraError(f"{path}: not UTF-8 text ({e}); re-save it as UTF-8") from None
    fields = fields or {}
    records = _jsonl(text) if kind == "jsonl" else _e2e(text) if kind == "e2e" else \
        _table(path, text, kind, strict_fields, fields)
    examples, skipped, first, ignored = [], 0, None, set()
    for line, ex in records:
        try:
            if isinstance(ex, _Bad):
                raise ex
            ex = _known_fields(_renamed(ex, fields) if kind in ("jsonl", "e2e") else ex, strict_fields, ignored)
            shape = _check_example(ex)
        except _Bad as e:
            if not skip_bad:
                raise LoraError(f"{path}:{line}: {e}") from None
            skipped += 1
            continue
        if first is None:
            first = (line, shape)
        elif shape != first[1]:
            raise LoraError(f"{path}:{line}: a {shape} example, but line {first[0]} is {first[1]}; all examples in "
                            "a file must have the same shape, so fix this line or split the file")
        examples.append(ex)
    if not examples:
        why = f"all {skipped} lines are bad" if skipped else "it is empty"
        raise LoraError(f"{path}: no examples ({why}); each line needs the fields {SHAPE_LIST}")
    if ignored:
        print(f"{path}: ignoring fields {', '.join(sorted(k or repr(k) for k in ignored))} (--strict-fields refuses "
              "them)", file=sys.stderr)
    return examples, skipped


def field_map(cfg) -> dict[str, str]:
    """{source column: lorakit field} from a config's text_field, prompt_field, ... (--text-field sentence: the
    column `sentence` is the example's text); fields left None keep their names."""
    out = {}
    for k in MAPPABLE:
        source = getattr(cfg, f"{k}_field", None)
        if source in out:
            raise LoraError(f"--{out[source]}-field and --{k}-field both name the column {source!r}; map each "
                            "lorakit field from its own column")
        if source:
            out[source] = k
    return out


def _renamed(ex: dict, fields: dict[str, str]) -> dict:
    """`ex` with its fields renamed per `fields` (a mapped field replaces one of the lorakit name); _Bad names the
    fields there are when a mapped one is missing."""
    if not fields or not isinstance(ex, dict):
        return ex
    missing = [s for s in fields if s not in ex]
    if missing:
        has = ", ".join(map(repr, ex)) or "no fields"
        raise _Bad(f"no field {missing[0]!r} (--{fields[missing[0]]}-field); it has {has}; fix the example or the "
                   "--*-field setting")
    out = {k: v for k, v in ex.items() if k not in fields.values() and k not in fields}
    return {**out, **{t: ex[s] for s, t in fields.items()}}


def _known_fields(ex: dict, strict: bool, ignored: set) -> dict:
    """`ex` without the fields no shape has, which go into `ignored`; with strict, such a field is _Bad."""
    extra = sorted(set(ex) - FIELDS)
    if not extra:
        return ex
    names = ", ".join(map(repr, extra))
    if strict:
        many = len(extra) > 1
        raise _Bad(f"field{'s' * many} {names} {'are' if many else 'is'} not part of an example ({SHAPE_LIST}); remove "
                   f"{'them' if many else 'it'}, or leave out --strict-fields to ignore such fields")
    kept = {k: v for k, v in ex.items() if k in FIELDS}
    if tuple(sorted(kept)) not in SHAPES:  # no shape left: name every field, a misspelt one may be the cause
        raise _Bad(_field_problem(set(ex)))
    ignored.update(extra)
    return kept


def _jsonl(text: str):
    """(line number, object or _Bad) per non-blank line. Split on \\n only: JSON strings may hold U+2028."""
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, _Bad(f"not valid JSON ({e.msg} at column {e.colno}); write one JSON object per line")
            continue
        yield n, ex if isinstance(ex, dict) else _Bad(f"a JSON {_json_type(ex)}, not an object; write one object "
                                                      'per line, like {"text": "..."}')


def _e2e(text: str):
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            mr, sep, ref = line.partition("||")
            # the file's own "||" stays as the separator a causal LM continues after
            yield n, ({"prompt": f"{mr.strip()} ||", "completion": f" {ref.strip()}"} if sep else
                      _Bad("no '||' between the meaning representation and the reference; write lines like "
                           "'name : The Vaults | Type : pub||The Vaults is a pub.'"))


def _table(path: Path, text: str, delimiter: str, strict: bool = False, fields: dict[str, str] | None = None):
    """(start line, row dict or _Bad) per data row of a CSV/TSV file; a label cell holding an integer becomes an int.
    Columns outside the shapes stay in the rows (read_examples drops them); with strict they are refused here.
    `fields` renames header columns (see field_map)."""
    # TSV files (GLUE and most corpora) are unquoted: a '"' in them is text, not quoting
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = [h.strip() for h in next(reader, [])]
    if not header:
        return
    fields = fields or {}
    if missing := [s for s in fields if s not in header]:
        raise LoraError(f"{path}:1: no column {missing[0]!r} (--{fields[missing[0]]}-field); the header has "
                        f"{header}; fix the header or the --*-field setting")
    replaced = set(fields.values()) - set(fields)
    header = [fields.get(h, "" if h in replaced else h) for h in header]  # "" is no field: dropped
    known = [h for h in header if h in FIELDS]
    if tuple(sorted(known)) not in SHAPES or known == ["messages"]:
        raise LoraError(f"{path}:1: the header {header} names no example shape; name the columns prompt,completion "
                        "or text or text,label (conversations need .jsonl)")
    if strict and len(known) < len(header):
        raise LoraError(f"{path}:1: the columns {[h for h in header if h not in FIELDS]} are not part of an example; "
                        "remove them, or leave out --strict-fields to ignore them")
    prev = reader.line_num
    for row in reader:
        line, prev = prev + 1, reader.line_num  # a quoted field may span lines: report where the row starts
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            fix = "a tab inside a field cannot be written in TSV" if delimiter == "\t" else \
                f"quote fields that contain {delimiter!r} or a line break"
            yield line, _Bad(f"{len(row)} fields but the header has {len(header)}; {fix}")
            continue
        ex = dict(zip(header, row))
        if re.fullmatch(r"\s*-?\d+\s*", ex.get("label", "")):
            ex["label"] = int(ex["label"])
        yield line, ex


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(v), "null")


def _check_example(ex) -> str:
    """The shape of one example ("prompt/completion", "messages", "text" or "text/label"); _Bad says what is wrong."""
    if not isinstance(ex, dict):
        raise _Bad(f"a {type(ex).__name__}, not a dict; each example is a dict with the fields {SHAPE_LIST}")
    keys = tuple(sorted(ex))
    if keys not in SHAPES:
        raise _Bad(_field_problem(set(ex)))
    for k in ("prompt", "completion", "text"):
        if k in ex and not isinstance(ex[k], str):
            raise _Bad(f"{k!r} is a {_json_type(ex[k])}, not a string; write it as a string")
        if k in ex and not ex[k].strip():
            raise _Bad(f"{k!r} is empty; fill it in or remove the line")
    label = ex.get("label", 0)
    if isinstance(label, bool) or not isinstance(label, (int, str)) or not str(label).strip():
        raise _Bad(f"'label' is {json.dumps(label)}; write an integer class index or a non-empty class name")
    if "messages" in ex:
        _check_messages(ex["messages"])
    return SHAPES[keys]


def _field_problem(keys: set) -> str:
    """Missing and unexpected fields, measured against the nearest shape."""
    fix = f"each example has exactly the fields {SHAPE_LIST}"
    if not keys:
        return f"an empty object; {fix}"
    best = set(min(SHAPES, key=lambda s: (len(keys ^ set(s)), -len(keys & set(s)))))
    missing, extra = sorted(best - keys), sorted(keys - best)
    parts = [f"{what} field{'s' * (len(ks) > 1)} {', '.join(map(repr, ks))}"
             for what, ks in (("missing", missing), ("unexpected", extra)) if ks]
    return f"{' and '.join(parts)}; {fix}"


def _check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise _Bad("'messages' must be a non-empty list; write [{\"role\": \"user\", \"content\": \"...\"}, ...]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Bad(f"message {i} ({json.dumps(m)[:60]}) lacks a string 'role' or 'content'; give every "
                       'message both, like {"role": "user", "content": "..."}')
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad("no assistant message, so nothing to learn; add the reply as {\"role\": \"assistant\", ...}")


def _shape_of(examples: list[dict]) -> str:
    """The one shape shared by in-memory examples (read_examples has checked a file's already)."""
    if not examples:
        raise LoraError("no examples to tokenize")
    shapes = set()
    for i, ex in enumerate(examples):
        try:
            shapes.add(_check_example(ex))
        except _Bad as e:
            raise LoraError(f"example {i}: {e}") from None
    if len(shapes) > 1:
        raise LoraError(f"examples of several shapes ({', '.join(sorted(shapes))}); tokenize one shape at a time")
    return shapes.pop()


# --- tokenizing -----------------------------------------------------------------------------------
def tokenize_causal(examples: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """(rows, dropped): rows {"input_ids", "labels"} for causal-LM training, labels IGNORE where no loss is wanted.

    prompt/completion: loss on the completion and the eos after it; messages: the chat template, loss on each
    assistant turn after its header (content and end-of-turn marker); text: loss on every token (+ eos). Rows keep
    their first max_length tokens; a row left with no loss token is dropped and counted."""
    shape = _shape_of(examples)
    if shape == "text/label":
        raise LoraError("these are classification examples ({text, label}); use tokenize_classify")
    pairs = _causal(examples, shape, tokenizer, max_length)
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in filter(None, pairs)]
    dropped = len(pairs) - len(rows)
    if not rows:
        raise LoraError(f"all {dropped} examples lost every loss token to truncation at max_length={max_length}; "
                        "raise max_length or shorten the prompts")
    return rows, dropped


def _causal(examples: list[dict], shape: str, tokenizer, max_length: int) -> list[tuple[list, list] | None]:
    """(ids, labels) of each checked causal-LM example (see tokenize_causal), or None where truncation to
    max_length left no loss token."""
    if max_length < 2:
        raise LoraError(f"max_length={max_length}: a causal LM needs at least 2 tokens to predict one")
    if shape == "messages":
        pairs = [_chat(ex["messages"], tokenizer) for ex in examples]
    else:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise LoraError("the tokenizer has no eos token, so the model could not learn where to stop; set "
                            "tokenizer.eos_token")
        if shape == "text":
            pairs = [(x + [eos], x + [eos]) for x in tokenizer([ex["text"] for ex in examples])["input_ids"]]
        else:
            prompts = tokenizer([ex["prompt"] for ex in examples])["input_ids"]  # with the bos, if the model has one
            completions = tokenizer([ex["completion"] for ex in examples], add_special_tokens=False)["input_ids"]
            pairs = [(p + c + [eos], [IGNORE] * len(p) + c + [eos]) for p, c in zip(prompts, completions)]
    pairs = [(ids[:max_length], labels[:max_length]) for ids, labels in pairs]
    # labels[0] is never a target: nothing comes before it
    return [None if all(x == IGNORE for x in labels[1:]) else (ids, labels) for ids, labels in pairs]


def _chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation. An assistant turn spans from the end of the conversation before it, rendered
    with the generation prompt (its header), to the end of the conversation up to it: template-independent."""
    if not getattr(tokenizer, "chat_template", None):
        raise LoraError("the tokenizer has no chat template, which messages examples need; use an instruct model's "
                        "tokenizer or set tokenizer.chat_template")
    ids = _render(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else []  # a template needs a message
        upto = _render(tokenizer, messages[:i + 1])
        if ids[:len(before)] != before or ids[:len(upto)] != upto:
            raise LoraError(f"the chat template renders the conversation up to message {i} differently from the "
                            "same messages inside the whole conversation, so the assistant turns cannot be located; "
                            "use a template that renders each turn the same wherever it stands")
        labels[len(before):len(upto)] = ids[len(before):len(upto)]
    return ids, labels


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own special tokens


def label_names(examples: list[dict]) -> list[str]:
    """The classes of {text, label} examples: string labels sorted, or "0" .. "max" for int labels (their own index).
    A model's number of labels, before any tokenizing."""
    if _shape_of(examples) != "text/label":
        raise LoraError("classification needs {text, label} examples; use tokenize_causal for the other shapes")
    return _classes([ex["label"] for ex in examples])


def _classes(values: list) -> list[str]:
    """Class names of label values: string labels sorted, or "0" .. "max" for int labels (their own index)."""
    if len({type(v) for v in values}) > 1:
        raise LoraError(f"labels mix integers and strings ({values[0]!r}, ...); use class names or indices, not both")
    return [str(i) for i in range(max(values) + 1)] if isinstance(values[0], int) else sorted(set(values))


def tokenize_classify(examples: list[dict], tokenizer, max_length: int,
                      labels: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """(rows, label names): rows {"input_ids", "label"}, label the index into the names (see label_names).

    Pass labels= (e.g. the training set's names, for an eval set) to fix the mapping. The tokenizer truncates."""
    names = label_names(examples)  # which also checks the examples
    names = names if labels is None else list(labels)
    values = [ex["label"] for ex in examples]
    index = _class_index(values, names)
    bad = sorted({v for v, i in zip(values, index) if i is None}, key=str)
    if bad:
        raise LoraError(f"labels {bad[:5]} are not among the {len(names)} classes {names[:10]}; fix the examples or "
                        "pass the full list as labels=")
    ids = tokenizer([ex["text"] for ex in examples], truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": x, "label": y} for x, y in zip(ids, index)], names


def _class_index(values: list, names: list[str]) -> list[int | None]:
    """Each label's index into `names`: an int in range is its own index, a name its position; None if neither."""
    where = {name: i for i, name in enumerate(names)}
    return [v if isinstance(v, int) and 0 <= v < len(names) else where.get(v) for v in values]


# --- batching -------------------------------------------------------------------------------------
def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into LongTensors: input_ids with pad_id, labels with IGNORE, attention_mask 1 on real tokens;
    a classification row's int "label" becomes the (batch,) tensor "labels"."""
    if not batch:
        raise LoraError("collate got an empty batch")
    if pad_id is None:
        raise LoraError("no pad id (the tokenizer has no pad token); pass tokenizer.eos_token_id as pad_id")
    width = max(len(r["input_ids"]) for r in batch)

    def pad(key, value):
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in batch], dtype=torch.long)

    out = {"input_ids": pad("input_ids", pad_id),
           "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                           for r in batch], dtype=torch.long)}
    if "labels" in batch[0]:
        out["labels"] = pad("labels", IGNORE)
    elif "label" in batch[0]:
        out["labels"] = torch.tensor([r["label"] for r in batch], dtype=torch.long)
    return out


# --- data sets through `datasets`: parquet, Arrow and JSON files, save_to_disk folders, hub ids ------------------
OK, BAD, EMPTY = 0, 1, 2  # a tokenized row's status: kept, bad (skipped with skip_bad), no loss token left


def read_data(spec: str, fields: dict[str, str] | None = None, skip_bad: bool = False, strict_fields: bool = False,
              eval: bool = False, streaming: bool = False, seed: int = 0, shuffle_buffer: int = 0):
    """(examples, bad lines skipped) of a --data / --eval-data value (see the module docstring): read_examples' list
    for the line formats, else a `datasets` Dataset (memory-mapped, never made a list) or, streaming, an
    IterableDataset (shuffled with a buffer if shuffle_buffer), cut to the columns of one example shape. The bad rows
    of a data set are found as encode_dataset tokenizes it."""
    where, split = dataset.locate(spec)
    suffix = Path(where).suffix.lower()
    if suffix in SUFFIXES and not (streaming and suffix == ".jsonl"):
        if streaming:
            raise LoraError(f"{spec}: --streaming reads .jsonl, .json, .parquet and .arrow files, save_to_disk folders "
                            f"and hub ids, not {suffix} files; leave out --streaming (the file is read whole)")
        if split:
            raise LoraError(f"{spec}: a {suffix} file has no splits; leave out ':{split}'")
        return read_examples(where, skip_bad, strict_fields, fields)
    ds = dataset.load(spec, where, split, eval, streaming)
    if streaming and shuffle_buffer:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return _columns(ds, spec, fields or {}, strict_fields), 0


def _names(ds) -> list[str]:
    """The columns of a data set (of a stream without known features: its first example's keys)."""
    return list(ds.column_names or next(iter(ds), {}))


def _columns(ds, spec: str, fields: dict[str, str], strict: bool):
    """`ds` with its columns renamed per `fields` and cut to those of its example shape; errors name the columns."""
    names = _names(ds)
    if missing := [s for s in fields if s not in names]:
        raise LoraError(f"{spec}: no column {missing[0]!r} (--{fields[missing[0]]}-field); its columns are "
                        f"{', '.join(names)}")
    replaced = [n for n in names if n in fields.values() and n not in fields]  # a mapped column takes their name
    renames = {s: t for s, t in fields.items() if s != t}
    ds = ds.remove_columns(replaced) if replaced else ds
    ds = ds.rename_columns(renames) if renames else ds
    names = [fields.get(n, n) for n in names if n not in replaced]
    if tuple(sorted(n for n in names if n in FIELDS)) not in SHAPES:
        raise LoraError(f"{spec}: its columns {', '.join(names)} hold no example shape ({SHAPE_LIST}); name the "
                        "columns to use with --text-field, --prompt-field, --completion-field, --messages-field or "
                        "--label-field (e.g. --text-field sentence)")
    if extra := [n for n in names if n not in FIELDS]:
        if strict:
            raise LoraError(f"{spec}: the columns {', '.join(extra)} are not part of an example; leave out "
                            "--strict-fields to ignore them")
        print(f"{spec}: ignoring columns {', '.join(extra)} (--strict-fields refuses them)", file=sys.stderr)
        ds = ds.remove_columns(extra)
    return ds


def _ds_shape(ds) -> str:
    return SHAPES[tuple(sorted(_names(ds)))]


def labels_of(examples, spec: str) -> list[str]:
    """The class names of read_data's examples: label_names for a list; for a data set a ClassLabel column's names,
    else its sorted distinct labels (strings), or "0" .. "max" (integers)."""
    import datasets

    if isinstance(examples, list):
        return label_names(examples)
    if _ds_shape(examples) != "text/label":
        raise LoraError(f"{spec}: classification needs text and label columns; name them with --text-field and "
                        "--label-field")
    feature = (examples.features or {}).get("label")
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if not isinstance(examples, datasets.Dataset):
        raise LoraError(f"{spec}: classifying a stream needs the class names up front, as a ClassLabel label column "
                        f"carries them, but its label column is {feature}; leave out --streaming")
    values = [v for v in examples.unique("label") if isinstance(v, int | str) and not isinstance(v, bool) and
              str(v).strip()]  # the bad ones are bad rows when it is encoded
    if not values:
        raise LoraError(f"{spec}: no valid label; write integer class indices or non-empty class names")
    return _classes(values)


def encode_dataset(ds, spec: str, task: str, tokenizer, max_length: int, labels: list[str] | None = None,
                   skip_bad: bool = False):
    """(rows, bad rows skipped) of read_data's data set, as tokenize_causal / tokenize_classify make them.

    A Dataset is checked and tokenized by Dataset.map in batches into a memory-mapped Dataset of token rows, written
    to lorakit's cache dir (not next to the data) under a key of the data, the settings, the tokenizer and this
    code, so a re-run reads it back; causal rows left without a loss token are dropped. A bad row is a LoraError
    "SPEC row N: problem; fix" before training starts, or is skipped and counted with skip_bad. An IterableDataset
    becomes a Stream, which does the same as training reads it."""
    import datasets
    import numpy as np
    from datasets.fingerprint import Hasher

    from lorakit.core.cache import cache_dir

    shape = _ds_shape(ds)
    if (shape == "text/label") != (task == "classify"):
        raise LoraError(f"{spec}: {shape} examples, but the task is {task}; classification needs text and label "
                        "columns, causal LM the others (see --task and the --*-field settings)")
    kw = {"spec": spec, "shape": shape, "tokenizer": tokenizer, "max_length": max_length, "labels": labels,
          "skip_bad": skip_bad}
    if not isinstance(ds, datasets.Dataset):
        return Stream(ds, kw), 0
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    key = Hasher.hash([ds._fingerprint, code, {k: v for k, v in kw.items() if k != "spec"}])
    folder = cache_dir() / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    ids = datasets.List(datasets.Value("int32"))
    features = datasets.Features({"input_ids": ids, "_status": datasets.Value("int8"),
                                  **({"label": datasets.Value("int64")} if labels is not None else {"labels": ids})})
    rows = ds.map(_encode_batch, batched=True, with_indices=True, fn_kwargs=kw, remove_columns=ds.column_names,
                  features=features, cache_file_name=str(folder / f"{key}.arrow"), new_fingerprint=key,
                  desc=f"tokenizing {spec}")
    counts = np.bincount(rows.with_format("numpy")["_status"], minlength=3).tolist()
    if not counts[OK]:
        why = f"{counts[BAD]} bad rows skipped, {counts[EMPTY]} left without a loss token at max_length={max_length}"
        raise LoraError(f"{spec}: no examples to train on ({why}); fix the data or raise max_length")
    if counts[OK] < len(rows):
        rows = rows.filter(lambda s: [x == OK for x in s], input_columns="_status", batched=True,
                           cache_file_name=str(folder / f"{key}-kept.arrow"))
    return rows.remove_columns("_status"), counts[BAD]


def _encode_batch(batch: dict, indices: list[int], **kw) -> dict:
    """Dataset.map's function: a batch of columns -> columns of token rows and each row's status."""
    rows = _encode_examples([dict(zip(batch, values)) for values in zip(*batch.values())], indices, **kw)
    key = "labels" if kw["labels"] is None else "label"
    return {"input_ids": [r["input_ids"] for _, r in rows], key: [r[key] for _, r in rows],
            "_status": [status for status, _ in rows]}


def _encode_examples(examples: list[dict], indices, spec, shape, tokenizer, max_length, labels, skip_bad):
    """(status, token row) of each example; a bad one raises LoraError "SPEC row N: ..." unless skip_bad."""
    status, good = [], []
    for i, ex in zip(indices, examples):
        try:
            _check_example(ex)
            if labels is not None and _class_index([ex["label"]], labels)[0] is None:
                raise _Bad(f"label {ex['label']!r} is not among the {len(labels)} classes {labels[:10]}; fix the "
                           "row, or leave it out with --skip-bad")
        except _Bad as e:
            if not skip_bad:
                raise LoraError(f"{spec} row {i}: {e}") from None
            status.append(BAD)
            continue
        status.append(OK)
        good.append(ex)
    if labels is not None:
        texts = [ex["text"] for ex in good]
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if good else []
        made = [{"input_ids": x, "label": y} for x, y in zip(ids, _class_index([ex["label"] for ex in good], labels))]
        blank = {"input_ids": [], "label": -1}
    else:
        made = [p and {"input_ids": p[0], "labels": p[1]} for p in (_causal(good, shape, tokenizer, max_length)
                                                                     if good else [])]
        blank = {"input_ids": [], "labels": []}
    made = iter(made)
    out = []
    for s in status:
        row = next(made) if s == OK else None
        out.append((OK, row) if row else (EMPTY if s == OK else s, blank))
    return out


class Stream:
    """Training rows of an IterableDataset, checked and tokenized as they are read (no length, no list): global step
    k takes the next n good rows of the data in order, read again from its start (the next epoch, reshuffled if
    shuffled) when it ends. Its state_dict goes into the run's checkpoints, so a resumed run goes on with exactly
    the rows an uninterrupted one reads."""

    def __init__(self, ds, kw: dict):
        self.ds, self.kw = ds, kw
        self.load_state_dict({})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "taken": self.taken, "skipped": self.skipped}

    def load_state_dict(self, state: dict):
        self.epoch, self.offset, self.taken, self.skipped = (int(state.get(k, 0)) for k in
                                                             ("epoch", "offset", "taken", "skipped"))
        self.close()

    def close(self):
        """End the read under way now (datasets' stream waits for Arrow's threads as it ends) rather than as Python
        exits, where it would print noise."""
        if getattr(self, "_raw", None) is not None:
            self._raw.close()
        self._raw = self._it = None

    def batch(self, step: int, n: int) -> list[dict]:
        """The n rows of global step `step`, read on from where the stream stands (after step-1, or a checkpoint)."""
        if self.taken > step * n:  # asked for an earlier step: read again from the start
            self.load_state_dict({})
        out = []
        while self.taken < (step + 1) * n:
            row = self._next()
            self.taken += 1
            if self.taken > step * n:
                out.append(row)
        return out

    def _next(self) -> dict:
        while True:
            if self._it is None:
                self.ds.set_epoch(self.epoch)  # a shuffled stream's order for this epoch
                self._raw = iter(self.ds)
                self._it = itertools.islice(self._raw, self.offset, None)
                self._found = 0 if self.offset == 0 else None  # rows found in a whole epoch (None: begun midway)
            ex = next(self._it, None)
            if ex is None:
                if self._found == 0:
                    raise LoraError(f"{self.kw['spec']}: no examples to train on in the whole stream (bad, or left "
                                    "without a loss token); fix the data or raise max_length")
                self.epoch, self.offset = self.epoch + 1, 0
                self.close()
                continue
            (status, row), = _encode_examples([ex], [self.offset], **self.kw)
            self.offset += 1
            self.skipped += status == BAD
            if status == OK:
                self._found = None if self._found is None else self._found + 1
                return row
