"""Training data for `lorakit train`: read examples from a file, tokenize them with the loss where it belongs, and
pad them into batches.

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
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

import torch

from lorakit.core.errors import LoraError

IGNORE = -100  # the label that cross-entropy (and every transformers model) leaves out of the loss
SHAPES = {("completion", "prompt"): "prompt/completion", ("messages",): "messages", ("text",): "text",
          ("label", "text"): "text/label"}
FIELDS = {k for shape in SHAPES for k in shape}
SHAPE_LIST = "{prompt, completion}, {messages}, {text} or {text, label}"
SUFFIXES = {".jsonl": "jsonl", ".csv": ",", ".tsv": "\t", ".txt": "e2e"}


class _Bad(Exception):
    """What is wrong with one example and how to fix it; read_examples adds FILE:LINE."""


# --- reading --------------------------------------------------------------------------------------
def read_examples(path, skip_bad: bool = False, strict_fields: bool = False) -> tuple[list[dict], int]:
    """(examples, number of bad lines skipped) of a .jsonl, .csv, .tsv or E2E .txt file; see the module docstring.

    A bad line raises LoraError "FILE:LINE: problem; fix", or is skipped and counted with skip_bad. Examples of
    different shapes in one file, and a file without a valid example, are errors either way. Fields outside the
    shapes are dropped with one notice on stderr, or are bad lines with strict_fields."""
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
    records = _jsonl(text) if kind == "jsonl" else _e2e(text) if kind == "e2e" else \
        _table(path, text, kind, strict_fields)
    examples, skipped, first, ignored = [], 0, None, set()
    for line, ex in records:
        try:
            if isinstance(ex, _Bad):
                raise ex
            ex = _known_fields(ex, strict_fields, ignored)
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


def _table(path: Path, text: str, delimiter: str, strict: bool = False):
    """(start line, row dict or _Bad) per data row of a CSV/TSV file; a label cell holding an integer becomes an int.
    Columns outside the shapes stay in the rows (read_examples drops them); with strict they are refused here."""
    # TSV files (GLUE and most corpora) are unquoted: a '"' in them is text, not quoting
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = [h.strip() for h in next(reader, [])]
    if not header:
        return
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
    rows, dropped = [], 0
    for ids, labels in pairs:
        ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels[1:]):  # labels[0] is never a target: nothing comes before it
            dropped += 1
        else:
            rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise LoraError(f"all {dropped} examples lost every loss token to truncation at max_length={max_length}; "
                        "raise max_length or shorten the prompts")
    return rows, dropped


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
    values = [ex["label"] for ex in examples]
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
    where = {name: i for i, name in enumerate(names)}
    index = [v if isinstance(v, int) and 0 <= v < len(names) else where.get(v) for v in values]
    bad = sorted({v for v, i in zip(values, index) if i is None}, key=str)
    if bad:
        raise LoraError(f"labels {bad[:5]} are not among the {len(names)} classes {names[:10]}; fix the examples or "
                        "pass the full list as labels=")
    ids = tokenizer([ex["text"] for ex in examples], truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": x, "label": y} for x, y in zip(ids, index)], names


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
