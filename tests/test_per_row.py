"""Per-row adapter sets (serving many adapters in one batch): each row equals the same row run alone, in a plain
forward and in generate() with the KV cache, fp32 and bf16; one pair of products per group of rows, never per row."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.core import layers
from lorakit.core.layers import LoraLayer

SETS = [None, "a", "b", {"a": 0.5, "b": -1.0}, "a", ["b"], {"a": 1.0}, {}]


def tiny(dtype=torch.float32):
    """A tiny Llama with peaked outputs (so greedy choices are not near-ties) and adapters a, b with nonzero B."""
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                     pad_token_id=0)).eval()
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear", init=False), name="a")
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"], init=False), name="b")
    return m.to(dtype)


def alone(model, s, fn):
    """fn() with set s active, on the reference path (the fused path rounds differently in bf16: an ulp, compounded)."""
    lorakit.set_weights(model, {} if s is None else s)
    layers.use_fast(False)
    try:
        with torch.no_grad():
            return fn()
    finally:
        layers.use_fast(True)
        lorakit.set_weights(model, {})


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_each_row_equals_the_row_run_alone(dtype, tol):
    m = tiny(dtype)
    x = torch.randint(1, 64, (len(SETS), 7))
    with torch.no_grad(), lorakit.per_row(m, SETS):
        y = m(x).logits
    for i, s in enumerate(SETS):
        yi = alone(m, s, lambda: m(x[i: i + 1]).logits)[0]
        assert (y[i].float() - yi.float()).abs().max() <= tol
    assert lorakit.active(m) == {} and all(l.lora_rows is None for l in m.modules() if isinstance(l, LoraLayer))


def test_adapters_change_the_rows_they_are_given():
    m = tiny()
    x = torch.randint(1, 64, (1, 5)).repeat(3, 1)
    with torch.no_grad(), lorakit.per_row(m, [None, "a", {"a": -1.0}]):
        y = m(x).logits
    assert (y[0] - y[1]).abs().max() > 1e-2 and (y[1] - y[2]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_with_the_kv_cache_gives_each_row_its_own_greedy_tokens(dtype):
    m = tiny(dtype)
    torch.manual_seed(1)
    prompts = [torch.randint(1, 64, (n,)) for n in (3, 6, 4, 5, 2, 6, 3, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]).long()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad(), lorakit.per_row(m, SETS):
        out = m.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:]
    for i, (p, s) in enumerate(zip(prompts, SETS)):
        single = alone(m, s, lambda: m.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p)), **kw))
        assert out[i].tolist() == single[0, len(p):].tolist(), f"row {i} ({s})"


def test_one_pair_of_batched_products_for_all_groups_and_the_base_once(monkeypatch):
    m = tiny()
    layer = m.model.layers[0].self_attn.q_proj
    inside, bmm, base = [], [], []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: (bmm.append((a.shape, b.shape)) if inside else None,
                                                    real_bmm(a, b))[1])
    layer.register_forward_pre_hook(lambda mod, inp: (inside.append(1), base.append(inp[0].shape[0]))[0] and None)
    layer.register_forward_hook(lambda mod, inp, out: inside.clear())
    with torch.no_grad(), lorakit.per_row(m, ["a", "a", "b", "a", None, "b"]):
        m(torch.randint(1, 64, (6, 4)))
    assert base == [6]  # the base layer ran once, on all six rows
    # groups a (rows 0, 1, 3) and b (2, 5; padded to 3 rows) in one pair of batched products; row 4 none
    assert bmm == [((2, 3 * 4, 32), (2, 32, 4)), ((2, 3 * 4, 4), (2, 4, 32))]


@pytest.mark.parametrize("sets", [["a", "a", None], ["a", None, "a"], [{"b": 2.0}, "a", {"b": 2.0}], [None, None]])
def test_single_group_layers_use_a_slice_or_an_index_and_stay_exact(sets):
    m = tiny()
    x = torch.randint(1, 64, (len(sets), 5))
    with torch.no_grad(), lorakit.per_row(m, sets):
        y = m(x).logits
    for i, s in enumerate(sets):
        assert (y[i] - alone(m, s, lambda: m(x[i: i + 1]).logits)[0]).abs().max() <= 1e-5


def test_rows_must_match_the_batch_and_name_known_adapters():
    m = tiny()
    with pytest.raises(lorakit.LoraError, match="no adapter named 'zz'"):
        lorakit.set_rows(m, ["a", "zz"])
    assert all(l.lora_rows is None for l in m.modules() if isinstance(l, LoraLayer))
    with torch.no_grad(), lorakit.per_row(m, ["a", "b"]), pytest.raises(lorakit.LoraError, match="3 rows but"):
        m(torch.randint(1, 64, (3, 4)))


def test_merged_models_and_whole_module_adapters_are_refused():
    m = tiny()
    lorakit.set_weights(m, "a")
    lorakit.merge(m)
    with pytest.raises(lorakit.LoraError, match="unmerge"):
        lorakit.set_rows(m, ["a"])
    lorakit.unmerge(m)
    lorakit.inject(m, lorakit.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]), name="head")
    with pytest.raises(lorakit.LoraError, match="modules_to_save"):
        lorakit.set_rows(m, ["a", "head"])


def test_slots_stay_exact_over_changing_batches_ranks_and_factors():
    """Each linear layer keeps its sets' factors in slots, reused while unchanged: many batches of changing sets
    (ranks 2, 4, 8 and a stack of 2 + 8 in one layer) still equal each row alone, and factors changed in place are read again."""
    m = tiny()
    lorakit.inject(m, lorakit.LoraConfig(r=8, alpha=8, targets=["q_proj", "o_proj"], init=False), name="c")
    choices = [None, "a", "b", "c", {"a": 0.5, "b": -1.0}, {"c": 2.0}, {"b": 1.0, "c": 0.5}]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 64, (6, 4))
    for step in range(10):
        if step == 6:
            with torch.no_grad():
                m.model.layers[0].self_attn.q_proj.lora_B["c"].add_(0.5)  # as an optimizer step would
        sets = [choices[i] for i in torch.randint(0, len(choices), (6,), generator=gen)]
        with torch.no_grad(), lorakit.per_row(m, sets):
            y = m(x).logits
        for i, s in enumerate(sets):
            assert (y[i] - alone(m, s, lambda: m(x[i: i + 1]).logits)[0]).abs().max() <= 1e-5, (step, i, s)
    layer = m.model.layers[0].self_attn.q_proj
    assert layer.lora_slot_A.shape[1] == 10 and len(layer.lora_slots) <= layer.lora_slot_A.shape[0]
