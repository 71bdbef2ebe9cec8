"""Shared test fixtures: tiny models saved as ordinary transformers folders (no downloads)."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def _save_tiny(folder):
    """A tiny Llama and a word-level tokenizer, saved as an ordinary transformers folder."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, bos_token_id=1,
                                 eos_token_id=1)).save_pretrained(folder)  # </s> is id 1 below
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture
def save_tiny():
    """save_tiny(folder) writes a tiny Llama + word-level tokenizer (words: a b c) and returns the folder."""
    return _save_tiny
