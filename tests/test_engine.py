"""The continuous-batching engine: requests join a running batch between steps and leave it when done, each row
with its own adapters, and every result equals the request run alone with HF generate()."""

import time

import torch
from test_per_row import tiny

import lorakit
from lorakit.llm.engine import Engine, QueueFull, Request


class Tok:
    """Token ids as text, one word each: enough for the engine, which only decodes."""

    eos_token_id, pad_token_id = None, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def alone(model, r: Request) -> list[int]:
    lorakit.set_rows(model, None)
    lorakit.set_weights(model, r.adapters)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([r.ids]), attention_mask=torch.ones(1, len(r.ids), dtype=torch.long),
                             max_new_tokens=r.max_tokens, do_sample=False, pad_token_id=0)
    lorakit.set_weights(model, {})
    return out[0, len(r.ids):].tolist()


def wait(cond, timeout=30):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline
        time.sleep(0.002)


def test_requests_join_and_leave_the_running_batch_and_equal_their_solo_runs():
    m = tiny()
    engine = Engine(m, Tok(), max_batch=4).start()
    try:
        long = Request([5, 6, 7], {"a": 1.0}, max_tokens=40, temperature=0, ignore_eos=True)
        engine.submit([long])
        wait(lambda: len(long.tokens) >= 5)
        late = [Request([9, 3], {}, max_tokens=6, temperature=0, ignore_eos=True),
                Request([4, 4, 4, 4, 4, 4, 4, 4], {"b": 1.0}, max_tokens=4, temperature=0, ignore_eos=True),
                Request([8], {"a": 0.5, "b": -1.0}, max_tokens=5, temperature=0, ignore_eos=True)]
        engine.submit(late)
        wait(lambda: all(r.finish_reason for r in late))
        assert long.finish_reason is None  # the late ones joined the running batch and left it first
        wait(lambda: long.finish_reason is not None)
        wait(lambda: not engine.running)
        assert engine.cache is None and not engine.waiting
    finally:
        engine.stop()
    for r in [long, *late]:
        assert r.finish_reason == "length" and r.tokens == alone(m, r)


def test_more_requests_than_rows_wait_their_turn_and_a_full_queue_refuses():
    m = tiny()
    engine = Engine(m, Tok(), max_batch=2, max_queue=3)
    reqs = [Request([i + 1, 2], {"a": 1.0} if i % 2 else {}, max_tokens=3 + i, temperature=0, ignore_eos=True)
            for i in range(3)]
    engine.submit(reqs)
    try:
        engine.submit([Request([1], max_tokens=2)])
        raise AssertionError("a fourth waiting request was taken")
    except QueueFull as e:
        assert "--max-queue 3" in str(e)
    engine.start()
    try:
        wait(lambda: all(r.finish_reason for r in reqs))
    finally:
        engine.stop()
    assert [r.tokens for r in reqs] == [alone(m, r) for r in reqs]


def test_a_listener_that_fails_cancels_its_request_only():
    m = tiny()
    engine = Engine(m, Tok(), max_batch=4).start()

    def gone(text, finish):
        raise ConnectionError("client left")

    try:
        bad = Request([3, 4], {"a": 1.0}, max_tokens=30, temperature=0, ignore_eos=True, on_event=gone)
        good = Request([3, 4], {"b": 1.0}, max_tokens=8, temperature=0, ignore_eos=True)
        engine.submit([bad, good])
        wait(lambda: good.finish_reason and bad.finish_reason)
    finally:
        engine.stop()
    assert bad.finish_reason == "cancelled" and len(bad.tokens) < 30
    assert good.finish_reason == "length" and good.tokens == alone(m, good)


def test_sampling_is_seeded_per_request_and_stop_strings_cut_the_text():
    m = tiny()
    engine = Engine(m, Tok(), max_batch=8).start()
    try:
        same = [Request([2, 3], {"a": 1.0}, max_tokens=12, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True)
                for s in (1, 1, 2)]
        greedy = Request([2, 3], {}, max_tokens=10, temperature=0, ignore_eos=True)
        engine.submit([*same, greedy])
        wait(lambda: all(r.finish_reason for r in [*same, greedy]))
        word = greedy.text[greedy.text.index(">") + 1:][:4]  # the start of the second token's text
        cut = Request([2, 3], {}, max_tokens=10, temperature=0, ignore_eos=True, stop=[word])
        engine.submit([cut])
        wait(lambda: cut.finish_reason)
    finally:
        engine.stop()
    assert same[0].tokens == same[1].tokens != same[2].tokens
    assert cut.finish_reason == "stop" and cut.text == greedy.text[: greedy.text.index(word)]
