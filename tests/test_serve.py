"""`lorakit serve`: an OpenAI-compatible server for one base and many adapters, tested with the real openai client
against real server processes on loopback ports: outputs equal `lorakit generate`'s, concurrent mixed-adapter requests
equal their single-request results, streams equal non-streams, runtime load/unload, every error answered."""

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from conftest import cache_repo
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from lorakit.cli import main

WORDS = ["<unk>", "</s>", "user", "assistant", "system"] + [f"w{i}" for i in range(43)]
CHAT = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}")
PROMPTS = ["w1 w2 w3", "w7", "w4 w4 w9 w30 w11", "w20 w21", "w5 w6 w40 w41", "w12 w3 w3 w8 w2 w2"]


def save_model(folder, hidden=32, seed=0):
    """A tiny Llama whose outputs are peaked (greedy choices are no near-ties) and a word-level chat tokenizer."""
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                 eos_token_id=1, initializer_range=0.2, max_position_embeddings=4096)
                     ).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    t.chat_template = CHAT
    t.save_pretrained(folder)
    return folder


def save_adapters(folder, out, targets: dict[str, object], seed=1):
    """One adapter file per name (random, nonzero B) for the model in `folder`."""
    torch.manual_seed(seed)
    m = LlamaForCausalLM.from_pretrained(folder)
    for name, t in targets.items():
        lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=t, init=False), name=name)
        lorakit.save(m, out / f"{name}.safetensors", name=name, base_model=str(folder))
    return {n: out / f"{n}.safetensors" for n in targets}


def http(url: str, body=None) -> tuple[int, str]:
    """(status, text) of a GET, or of a POST of `body` (a dict as JSON, or raw bytes)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    """`lorakit serve ...` in its own process on a free loopback port."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--port", "0", "--device", "cpu",
                                      *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        deadline, self.log = time.time() + 120, []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            self.log.append(line)
            if "serving" in line and "http://" in line:
                self.url = line.split()[-1]
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError("server did not start:\n" + "".join(self.log))
        else:
            self.proc.kill()
            raise RuntimeError("server did not start in 120 s:\n" + "".join(self.log))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep its pipe drained
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = http(self.url.removesuffix("/v1") + "/metrics")[1]
        return {k: float(v) for k, v in (line.split() for line in text.splitlines())}

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    model = save_model(d / "model")
    files = save_adapters(model, d, {"a": "all-linear", "b": ["q_proj", "v_proj"], "c": ["o_proj", "up_proj"]})
    save_adapters(save_model(d / "other", hidden=16), d / "other", {"small": "all-linear"})
    (d / "notes.txt").write_text("not an adapter")
    cache_repo(d / "hf-cache", "user/c", {"adapter.safetensors": files["c"]})  # the hub, as its offline cache
    return {"dir": d, "model": model, **files}


@pytest.fixture(scope="module")
def server(work):
    s = Server("--model", work["model"], "--adapter", f"a={work['a']}", "--adapter", f"b={work['b']}",
               "--allow-runtime-loading", "--max-batch", "8",
               env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work["dir"] / "hf-cache")})
    yield s
    s.close()


@pytest.fixture(scope="module")
def small(work):
    """One row at a time, one waiting, no runtime loading; the adapters of a folder."""
    s = Server("--model", work["model"], "--adapter-dir", work["dir"], "--max-batch", "1", "--max-queue", "1")
    yield s
    s.close()


def generate(capsys, work, prompt, adapters=(), chat=False, tokens=8) -> str:
    """What `lorakit generate` prints for the prompt."""
    args = ["generate", "--model", str(work["model"]), "--prompt", prompt, "--max-new-tokens", str(tokens),
            "--device", "cpu"] + [x for a in adapters for x in ("--adapter", a)] + ["--chat"] * chat
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    return out.split("\n", 1)[1].rstrip("\n")


def complete(client, model, prompt, tokens=8, **kw) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0, **kw).choices[0].text


def test_models_lists_the_base_and_each_adapter_with_its_parent(server, work):
    data = {m.id: m for m in server.client.models.list().data}
    assert list(data) == [str(work["model"]), "a", "b"]
    assert data["a"].parent == data["b"].parent == str(work["model"])
    assert data["a"].root == str(work["a"])


def test_greedy_outputs_equal_lorakit_generate(server, work, capsys):
    c = server.client
    for model, adapters in [("base", []), (str(work["model"]), []), ("a", [str(work["a"])]), ("b", [str(work["b"])])]:
        for p in PROMPTS[:3]:
            assert complete(c, model, p).strip() == generate(capsys, work, p, adapters)
    chat = c.chat.completions.create(model="a", messages=[{"role": "user", "content": "w3 w4"}], max_tokens=8,
                                     temperature=0)
    assert chat.choices[0].message.content.strip() == generate(capsys, work, "w3 w4", [str(work["a"])], chat=True)
    stack = complete(c, "base", PROMPTS[0], extra_body={"adapters": {"a": 0.5, "b": -1.0}})
    assert stack.strip() == generate(capsys, work, PROMPTS[0], [f"{work['a']}:0.5", f"{work['b']}:-1"])
    assert len({complete(c, m, PROMPTS[2]) for m in ("base", "a", "b")}) == 3  # the adapters do change the outputs


def test_24_concurrent_requests_over_base_and_2_adapters_equal_their_single_results(server):
    c = server.client
    jobs = [(m, p, 4 + (i % 5)) for i, (m, p) in enumerate([(m, p) for m in ("base", "a", "b") for p in PROMPTS]
                                                          + [("a", "w9"), ("b", "w9"), ("base", "w9"), ("a", "w1"),
                                                             ("b", "w2"), ("base", "w3")])]
    assert len(jobs) == 24
    alone = [complete(c, m, p, n) for m, p, n in jobs]
    before = server.metrics()["lorakit_engine_steps_total"]
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda j: complete(c, *j), jobs))
    assert together == alone
    steps = server.metrics()["lorakit_engine_steps_total"] - before
    assert steps < sum(n for _, _, n in jobs) / 2  # they were batched: far fewer steps than tokens


def test_stream_text_equals_the_non_stream_text(server):
    c = server.client
    for model in ("base", "a"):
        whole = c.completions.create(model=model, prompt=PROMPTS[4], max_tokens=12, temperature=0)
        parts = list(c.completions.create(model=model, prompt=PROMPTS[4], max_tokens=12, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
        assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
        assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens
        msgs = [{"role": "user", "content": PROMPTS[1]}]
        whole = c.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
        parts = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0, stream=True))
        assert parts[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
        assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sampling_options_seed_n_stop_and_usage(server):
    c = server.client
    kw = dict(model="a", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, top_p=0.9)
    one = c.completions.create(seed=7, n=3, **kw)
    again = c.completions.create(seed=7, n=3, **kw)
    assert [x.text for x in one.choices] == [x.text for x in again.choices]  # a seed repeats the samples
    assert len({x.text for x in one.choices}) > 1  # and the n choices differ
    assert one.usage.prompt_tokens == 3 and 3 <= one.usage.completion_tokens <= 30  # 3 words; 3 choices of ≤ 10
    assert one.usage.total_tokens == one.usage.prompt_tokens + one.usage.completion_tokens
    greedy = complete(c, "a", PROMPTS[2], 12)
    word = greedy.split()[2]
    cut = complete(c, "a", PROMPTS[2], 12, stop=[word])
    assert cut == greedy[: greedy.index(word)]
    streamed = "".join(p.choices[0].text for p in c.completions.create(
        model="a", prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[word], stream=True) if p.choices)
    assert streamed == cut


def test_runtime_load_and_unload(server, work, capsys):
    c, base = server.client, server.url.removesuffix("/v1")
    status, text = http(f"{base}/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(work["c"])})
    assert status == 200 and "added" in text
    assert "c" in [m.id for m in c.models.list().data]
    assert complete(c, "c", PROMPTS[3]).strip() == generate(capsys, work, PROMPTS[3], [str(work["c"])])
    with ThreadPoolExecutor(6) as pool:  # the new adapter in a batch with the others
        got = list(pool.map(lambda m: complete(c, m, PROMPTS[1]), ["a", "b", "c", "base", "c", "a"]))
    assert got == [complete(c, m, PROMPTS[1]) for m in ["a", "b", "c", "base", "c", "a"]]
    assert http(f"{base}/v1/unload_lora_adapter", {"lora_name": "c"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        complete(c, "c", PROMPTS[3])
    assert complete(c, "a", PROMPTS[3]).strip() == generate(capsys, work, PROMPTS[3], [str(work["a"])])


def test_runtime_load_by_hub_id(server, work, capsys):
    c, base = server.client, server.url.removesuffix("/v1")
    status, text = http(f"{base}/v1/load_lora_adapter", {"lora_name": "hub_c", "lora_path": "user/c"})
    assert status == 200 and "added" in text
    assert complete(c, "hub_c", PROMPTS[3]).strip() == generate(capsys, work, PROMPTS[3], [str(work["c"])])
    assert http(f"{base}/v1/unload_lora_adapter", {"lora_name": "hub_c"})[0] == 200


@pytest.mark.parametrize("body,status,words", [
    ({"lora_name": "x", "lora_path": "{d}/other/small.safetensors"}, 400, "made for base model"),
    ({"lora_name": "x", "lora_path": "{d}/notes.txt"}, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": "{d}/missing.safetensors"}, 400, "no such file"),
    ({"lora_name": "x", "lora_path": "nobody/missing"}, 400, "nobody/missing: not in the Hugging Face cache"),
    ({"lora_name": "a", "lora_path": "{d}/c.safetensors"}, 400, "taken"),
    ({"lora_name": "x"}, 400, "lora_path"),
])
def test_bad_loads_are_refused_and_change_nothing(server, work, body, status, words):
    body = {k: v.format(d=work["dir"]) for k, v in body.items()}
    got, text = http(server.url + "/load_lora_adapter", body)
    assert got == status and words in json.loads(text)["error"]["message"], text
    assert [m.id for m in server.client.models.list().data][1:] == ["a", "b"]


def test_errors_get_openai_json_and_the_server_keeps_serving(server, small):
    c = server.client
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(c, "nope", "w1")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="a", prompt="w1", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="context"):
        complete(c, "a", " ".join(["w1"] * 5000))
    with pytest.raises(openai.BadRequestError, match="no adapter named 'zz'"):
        complete(c, "base", "w1", extra_body={"adapters": {"a": 1, "zz": 0.5}})
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        complete(c, "a", "")
    with pytest.raises(openai.BadRequestError, match="presence_penalty: not supported"):
        c.completions.create(model="a", prompt="w1", presence_penalty=0.5)
    status, text = http(server.url + "/completions", b'{"model": "a", "prompt": ')
    assert status == 400 and json.loads(text)["error"]["code"] == "invalid_json"
    status, text = http(small.url + "/load_lora_adapter", {"lora_name": "x", "lora_path": "y"})
    assert status == 403 and "--allow-runtime-loading" in json.loads(text)["error"]["message"]
    assert complete(c, "a", "w1") == complete(c, "a", "w1")  # still serving


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(small):
    c = small.client
    long = dict(model="a", prompt="w1", max_tokens=4000, temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = c.completions.create(**long)
    next(iter(first))  # running: the one slot is taken
    second = c.completions.create(**long)  # waits: the queue (1) is full
    with pytest.raises(openai.RateLimitError, match="max-queue"):
        c.completions.create(**long)
    first.close()  # the client leaves mid-stream: its row goes, the waiting one runs
    next(iter(second))
    second.close()
    deadline = time.time() + 20
    while (m := small.metrics())["lorakit_requests_running"] or m["lorakit_requests_waiting"]:
        assert time.time() < deadline, m
        time.sleep(0.05)
    assert complete(c, "a", "w2", 3)


def test_adapter_dir_serves_each_adapter_file_in_it(small, work):
    assert [m.id for m in small.client.models.list().data] == [str(work["model"]), "a", "b", "c"]


def test_a_port_in_use_is_one_error_line(work, capsys):  # the other bad invocations: test_cli_robustness.py
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", str(work["model"]), "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on" in capsys.readouterr().err
