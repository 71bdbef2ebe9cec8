"""Training data: .jsonl/.csv/.tsv/E2E files of four example shapes, loss only where it belongs (completion,
assistant turns), truncation, bad lines named by FILE:LINE, skipping, classification labels and padding.
The tokenizer is a byte-level BPE trained in memory with a ChatML template: no downloads."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from lorakit import LoraError
from lorakit.llm.data import IGNORE, collate, label_names, read_examples, tokenize_causal, tokenize_classify

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The capital of France is Paris.", "What is the capital of Italy?", "Rome is the capital of Italy.",
          "The Vaults is a pub near the river.", "I loved this film, great acting!", "Terrible plot and bad acting."]
CHAT = [{"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome, of course."}]


@pytest.fixture(scope="module")
def tok():
    """GPT-2-style byte-level BPE (exact round trip), a bos added to plain text, eos, pad and a ChatML template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<pad>", "<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>")
    t.chat_template = CHATML
    return t


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n", encoding="utf-8")
    return path


def loss_spans(tok, row):
    """The decoded runs of consecutive tokens that carry a loss."""
    spans, run = [], []
    for i, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            assert label == i
            run.append(i)
        elif run:
            spans, run = spans + [tok.decode(run)], []
    return spans + [tok.decode(run)] if run else spans


# --- reading: formats and shapes ------------------------------------------------------------------
@pytest.mark.parametrize("example", [
    {"prompt": "Capital of France?", "completion": " Paris."},
    {"messages": CHAT},
    {"text": "The Vaults is a pub near the river."},
    {"text": "I loved this film", "label": "positive"},
    {"text": "Terrible plot", "label": 0},
], ids=["prompt_completion", "messages", "text", "text_label_str", "text_label_int"])
def test_jsonl_reads_each_shape_and_ignores_blank_lines(tmp_path, example):
    path = write(tmp_path, "d.jsonl", [example, "", "   ", example])
    assert read_examples(path) == ([example, example], 0)


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    path = write(tmp_path, "d.jsonl", ['{"text": "a\u2028b"}'])
    assert read_examples(path)[0] == [{"text": "a\u2028b"}]


def test_csv_and_tsv_read_a_header_row_quoted_fields_and_integer_labels(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion\n"Hi, there",Hello\n\n"two\nlines",x\n', encoding="utf-8")
    assert read_examples(tmp_path / "d.csv")[0] == [{"prompt": "Hi, there", "completion": "Hello"},
                                                    {"prompt": "two\nlines", "completion": "x"}]
    (tmp_path / "d.tsv").write_text("\ufefftext\tlabel\ngood, film\t1\nbad\t0\n", encoding="utf-8")  # BOM as Excel
    assert read_examples(tmp_path / "d.tsv")[0] == [{"text": "good, film", "label": 1}, {"text": "bad", "label": 0}]


def test_e2e_lines_become_prompt_and_completion(tmp_path):
    path = write(tmp_path, "e2e.txt", ["name : The Vaults | Type : pub | near : Café Adriatic||The Vaults pub is "
                                       "near Café Adriatic .", "", "name : Rome | Type : city||Rome is a city ."])
    assert read_examples(path)[0] == [
        {"prompt": "name : The Vaults | Type : pub | near : Café Adriatic ||",
         "completion": " The Vaults pub is near Café Adriatic ."},
        {"prompt": "name : Rome | Type : city ||", "completion": " Rome is a city ."}]


# --- reading: bad lines ---------------------------------------------------------------------------
GOOD = {"text": "fine"}


@pytest.mark.parametrize("name, lines, line, problem", [
    ("d.jsonl", [GOOD, '{"text": "unclosed}'], 2, "not valid JSON .*; write one JSON object per line"),
    ("d.jsonl", [GOOD, "", '["text"]'], 3, "a JSON array, not an object"),
    ("d.jsonl", [GOOD, {"prompt": "p"}], 2, "missing field 'completion'; each example has exactly the fields"),
    ("d.jsonl", [GOOD, {"prompt": "p", "id": 3}], 2, "missing field 'completion' and unexpected field 'id'"),
    ("d.jsonl", [{"prompt": "p", "response": "r"}], 1, "missing field 'completion' and unexpected field 'response'"),
    ("d.jsonl", [GOOD, {}], 2, "an empty object"),
    ("d.jsonl", [GOOD, {"text": 5}], 2, "'text' is a number, not a string; write it as a string"),
    ("d.jsonl", [GOOD, {"text": "  "}], 2, "'text' is empty; fill it in or remove the line"),
    ("d.jsonl", [{"text": "t", "label": None}], 1, "'label' is null; write an integer class index"),
    ("d.jsonl", [{"text": "t", "label": True}], 1, "'label' is true"),
    ("d.jsonl", [{"messages": []}], 1, "'messages' must be a non-empty list"),
    ("d.jsonl", [{"messages": [{"role": "user"}]}], 1, "message 0 .* lacks a string 'role' or 'content'"),
    ("d.jsonl", [{"messages": [{"content": "hi"}]}], 1, "message 0 .* lacks a string 'role' or 'content'"),
    ("d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}], 1, "no assistant message"),
    ("d.txt", ["mr||ref", "mr without separator"], 2, "no '\\|\\|' between the meaning representation"),
    ("d.txt", ["mr||"], 1, "'completion' is empty"),
    ("d.csv", ["text,label", "a,1", "b,1,extra"], 3, "3 fields but the header has 2; quote fields"),
    ("d.csv", ["text,label", "a,"], 2, "'label' is \"\""),
    ("d.csv", ["txt,label,id", "a,1,7"], 1, "the header \\['txt', 'label', 'id'\\] names no example shape"),
])
def test_a_bad_line_fails_with_file_line_problem_and_fix(tmp_path, name, lines, line, problem):
    path = write(tmp_path, name, lines)
    with pytest.raises(LoraError, match=f"^{path}:{line}: {problem}"):
        read_examples(path)


def test_skip_bad_skips_and_counts_bad_lines(tmp_path):
    path = write(tmp_path, "d.jsonl", [GOOD, "{oops", {"text": ""}, {"text": "also fine"}, {"prompt": "p"}])
    assert read_examples(path, skip_bad=True) == ([GOOD, {"text": "also fine"}], 3)
    csv = write(tmp_path, "d.csv", ["text,label", "a,pos", "b,pos,x", "c,neg"])
    assert read_examples(csv, skip_bad=True) == ([{"text": "a", "label": "pos"}, {"text": "c", "label": "neg"}], 1)


def test_mixed_shapes_fail_at_the_first_differing_line_even_with_skip_bad(tmp_path):
    path = write(tmp_path, "d.jsonl", [GOOD, GOOD, {"text": "x", "label": 1}, {"prompt": "p", "completion": "c"}])
    with pytest.raises(LoraError, match=f"^{path}:3: a text/label example, but line 1 is text; all examples in a "
                                        "file must have the same shape"):
        read_examples(path)
    path = write(tmp_path, "d.jsonl", ["{bad", GOOD, {"prompt": "p", "completion": "c"}])  # line 1 skipped
    with pytest.raises(LoraError, match=f"^{path}:3: a prompt/completion example, but line 2 is text"):
        read_examples(path, skip_bad=True)


def test_empty_files_and_files_without_a_valid_example_fail(tmp_path):
    for name in ("empty.jsonl", "empty.csv", "empty.txt"):
        (tmp_path / name).write_text("\n \n")
        with pytest.raises(LoraError, match=f"^{tmp_path / name}: no examples \\(it is empty\\)"):
            read_examples(tmp_path / name)
    path = write(tmp_path, "bad.jsonl", ["{", {"text": ""}])
    with pytest.raises(LoraError, match="no examples \\(all 2 lines are bad\\)"):
        read_examples(path, skip_bad=True)


def test_unknown_suffix_missing_file_and_non_utf8_fail(tmp_path):
    with pytest.raises(LoraError, match="unknown data format '.json'; use .jsonl, .csv, .tsv or .txt"):
        read_examples(tmp_path / "d.json")
    with pytest.raises(LoraError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")
    (tmp_path / "latin1.csv").write_bytes("text\ncafé\n".encode("latin-1"))
    with pytest.raises(LoraError, match="not UTF-8 text"):
        read_examples(tmp_path / "latin1.csv")


# --- causal tokenization: where the loss is -------------------------------------------------------
def test_prompt_completion_loss_is_exactly_the_completion_then_eos(tok):
    rows, dropped = tokenize_causal([{"prompt": "Capital of France?", "completion": " Paris."}], tok, 64)
    (row,) = rows
    assert dropped == 0 and row["input_ids"][0] == tok.bos_token_id and row["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["input_ids"]) == "<s>Capital of France? Paris.<|endoftext|>"
    assert loss_spans(tok, row) == [" Paris.<|endoftext|>"]


def test_text_loss_is_on_every_token_plus_eos(tok):
    (row,), _ = tokenize_causal([{"text": "Rome is the capital of Italy."}], tok, 64)
    assert row["labels"] == row["input_ids"]
    assert tok.decode(row["input_ids"]) == "<s>Rome is the capital of Italy.<|endoftext|>"


def test_messages_loss_is_exactly_the_assistant_replies_of_a_multi_turn_conversation(tok):
    (row,), _ = tokenize_causal([{"messages": CHAT}], tok, 256)
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    assert loss_spans(tok, row) == ["Paris.<|im_end|>\n", "Rome, of course.<|im_end|>\n"]  # headers, user: masked


def test_a_conversation_opening_with_the_assistant_trains_on_that_turn(tok):
    chat = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}]
    (row,), _ = tokenize_causal([{"messages": chat}], tok, 256)
    assert loss_spans(tok, row) == ["<|im_start|>assistant\nHello!<|im_end|>\n"]


def test_a_chat_template_that_renders_prefixes_differently_is_refused(tok):
    """Such a template (here: it prints the message count first) would put the loss on the wrong tokens."""
    other = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    other.chat_template = "{{ messages | length }}" + CHATML
    with pytest.raises(LoraError, match="renders the conversation up to message 2 differently"):
        tokenize_causal([{"messages": CHAT}], other, 256)
    other.chat_template = None
    with pytest.raises(LoraError, match="no chat template"):
        tokenize_causal([{"messages": CHAT}], other, 256)


def test_truncation_keeps_the_start_and_drops_examples_left_without_loss(tok):
    examples = [{"prompt": "Capital of France?", "completion": " Paris is the capital of France."},
                {"prompt": "What is the capital of Italy? " * 4, "completion": " Rome."}]
    prompt_len = len(tok("Capital of France?")["input_ids"])
    rows, dropped = tokenize_causal(examples, tok, prompt_len + 2)
    assert dropped == 1 and len(rows) == 1
    full = tokenize_causal(examples[:1], tok, 1000)[0][0]
    assert rows[0] == {"input_ids": full["input_ids"][:prompt_len + 2], "labels": full["labels"][:prompt_len + 2]}
    assert sum(x != IGNORE for x in rows[0]["labels"]) == 2
    (full,), _ = tokenize_causal([{"messages": CHAT}], tok, 1000)
    header_end = len(tok.apply_chat_template(CHAT[:4], add_generation_prompt=True, return_dict=True)["input_ids"])
    (row,), dropped = tokenize_causal([{"messages": CHAT}], tok, header_end + 2)  # 2 tokens into the second reply
    assert row == {"input_ids": full["input_ids"][:header_end + 2], "labels": full["labels"][:header_end + 2]}
    first, second = loss_spans(tok, row)
    assert dropped == 0 and first == "Paris.<|im_end|>\n" and second and "Rome, of course.".startswith(second)
    with pytest.raises(LoraError, match="all 1 examples lost every loss token to truncation at max_length=3"):
        tokenize_causal(examples[1:], tok, 3)
    with pytest.raises(LoraError, match="max_length=1: a causal LM needs at least 2 tokens"):
        tokenize_causal(examples, tok, 1)


def test_causal_and_classify_refuse_each_others_examples(tok):
    with pytest.raises(LoraError, match="classification examples .*; use tokenize_classify"):
        tokenize_causal([{"text": "a", "label": 1}], tok, 8)
    with pytest.raises(LoraError, match="classification needs \\{text, label\\} examples"):
        tokenize_classify([{"text": "a"}], tok, 8)
    with pytest.raises(LoraError, match="example 1: 'text' is empty"):
        tokenize_causal([{"text": "a"}, {"text": ""}], tok, 8)
    with pytest.raises(LoraError, match="examples of several shapes \\(prompt/completion, text\\)"):
        tokenize_causal([{"text": "a"}, {"prompt": "p", "completion": "c"}], tok, 8)


# --- classification -------------------------------------------------------------------------------
def test_classification_string_labels_map_to_sorted_indices(tok):
    examples = [{"text": "great acting", "label": "positive"}, {"text": "bad plot", "label": "negative"},
                {"text": "a film", "label": "neutral"}, {"text": "loved it", "label": "positive"}]
    rows, names = tokenize_classify(examples, tok, 64)
    assert names == ["negative", "neutral", "positive"] and [r["label"] for r in rows] == [2, 0, 1, 2]
    assert tok.decode(rows[0]["input_ids"], skip_special_tokens=True) == "great acting"
    rows, names = tokenize_classify(examples, tok, 64, labels=["positive", "negative", "neutral", "spam"])
    assert names == ["positive", "negative", "neutral", "spam"] and [r["label"] for r in rows] == [0, 1, 2, 0]
    with pytest.raises(LoraError, match="labels \\['neutral'\\] are not among the 2 classes"):
        tokenize_classify(examples, tok, 64, labels=["negative", "positive"])
    assert label_names(examples) == ["negative", "neutral", "positive"]  # known before tokenizing: the head's size


def test_classification_int_labels_are_their_own_index_and_texts_are_truncated(tok):
    rows, names = tokenize_classify([{"text": "The capital of France is Paris.", "label": 2},
                                     {"text": "Rome", "label": 0}], tok, 4)
    assert names == ["0", "1", "2"] and [r["label"] for r in rows] == [2, 0]
    assert len(rows[0]["input_ids"]) == 4 and rows[0]["input_ids"][0] == tok.bos_token_id
    assert label_names([{"text": "a", "label": 3}]) == ["0", "1", "2", "3"]
    with pytest.raises(LoraError, match="labels mix integers and strings"):
        tokenize_classify([{"text": "a", "label": 1}, {"text": "b", "label": "x"}], tok, 4, labels=["x", "y"])
    with pytest.raises(LoraError, match="labels \\[-1\\] are not among"):
        tokenize_classify([{"text": "a", "label": -1}, {"text": "b", "label": 1}], tok, 4)


# --- batching -------------------------------------------------------------------------------------
def test_collate_right_pads_ids_labels_and_mask():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    batch = collate([{"input_ids": [5, 6], "label": 2}, {"input_ids": [7], "label": 0}], pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6], [7, 9]] and batch["labels"].tolist() == [2, 0]
    with pytest.raises(LoraError, match="no pad id"):
        collate([{"input_ids": [1]}], pad_id=None)


def test_files_to_batches_that_models_accept(tmp_path, tok):
    """From file to a loss: the causal LM's loss is the mean over exactly the completion tokens."""
    path = write(tmp_path, "d.txt", ["name : Rome||Rome is the capital of Italy .", "name : Paris||Paris ."])
    rows, _ = tokenize_causal(read_examples(path)[0], tok, 64)
    batch = collate(rows, tok.pad_token_id)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=len(tok))).eval()
    out = lm(**batch)
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), targets, reduction="none")
    assert torch.allclose(out.loss, per_token[targets != IGNORE].mean())
    rows, names = tokenize_classify([{"text": "good", "label": "pos"}, {"text": "bad film", "label": "neg"}], tok, 8)
    clf = LlamaForSequenceClassification(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                                     num_labels=len(names), pad_token_id=tok.pad_token_id)).eval()
    batch = collate(rows, tok.pad_token_id)
    assert batch["labels"].tolist() == [names.index("pos"), names.index("neg")]
    # the shorter, padded row is read as it is alone; the loss is the mean cross-entropy at the given labels
    out, alone = clf(**batch), torch.cat([clf(**collate([r], tok.pad_token_id)).logits for r in rows])
    assert torch.allclose(out.logits, alone, atol=1e-5)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(alone, batch["labels"]), atol=1e-6)


def test_tsv_quotes_are_text_as_in_glue_files(tmp_path):
    path = tmp_path / "glue.tsv"
    path.write_text('text\tlabel\n"quoted" start of a sentence\t1\nit \'s a "gem"\t1\n')
    assert [e["text"] for e in read_examples(path)[0]] == ['"quoted" start of a sentence', 'it \'s a "gem"']
