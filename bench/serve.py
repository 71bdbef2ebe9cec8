"""A bounded load test of `lorakit serve` on loopback: tokens/s and p50/p95 request latency with 16 concurrent clients
spread over 1, 8 and 64 adapters, against (a) one merged model (the no-LoRA ceiling) and (b) PEFT's mixed-batch
inference (`generate(..., adapter_names=[...])`) on the same requests.

    .venv/bin/python bench/serve.py                          # ~11 min on 2 noisy CPU cores (673 s measured)
    .venv/bin/python bench/serve.py --targets all-linear     # the same with all-linear r=8 adapters
    .venv/bin/python bench/serve.py --requests 32 --rounds 1 # a quick look

Setup. SmolLM2-135M-Instruct (fp32, CPU) gets 64 random adapters a0..a63, r=8 alpha=16 on q_proj,v_proj (the LoRA
paper's recipe; --targets all-linear for every linear layer): A as lorakit's init=False draws it, B ~ N(0, --b-std)
so that the outputs stay fluent but differ. Each is written as a lorakit .safetensors file and as a PEFT folder.
A fixed, seeded list of --requests requests: the prompt is an E2E NLG meaning representation (../shared/data/e2e,
fixed strings if it is missing), max_tokens drawn from [--min-tokens, --max-tokens], temperature 0, ignore_eos (every
request runs to its max_tokens). For K adapters request i uses adapter a{i % K}.

Scenarios, each a closed loop over the same request list:
    lorakit K=1/8/64  one `lorakit serve --adapter-dir ... --max-batch 16` process holding all 64 adapters, reused for
                      every K; --clients client threads (openai client, /v1/completions), each sending its next
                      request when its previous one returns.
    merged model      `lorakit merge-into` of a0, served with no adapters (model "base"): the ceiling without LoRA.
    PEFT K=1/8/64     in-process, no HTTP: PeftModel with the 64 PEFT folders loaded; the request list in order as
                      static batches of --clients rows (left padding), `generate(adapter_names=..., do_sample=False,
                      max_new_tokens=the batch's largest max_tokens)`, EOS ignored. A static batch cannot drop rows that
                      are done, so only each request's own max_tokens count as tokens; a request's latency is its
                      batch's end minus the batch's start (its 16 requests arrive together).
tokens/s = completion tokens / wall seconds of the scenario. The machine is noisy, so the scenarios run in --rounds
interleaved rounds (the order rotates each round) and the table gives medians over rounds; the goal ratios are medians
of the per-round ratios. A hard --time-cap (seconds, for the measuring) stops it: clients send nothing new after it,
and scenarios not yet run are skipped (the table says so). Loading (servers, PEFT adapters) is not timed.

Sanity: the greedy texts of lorakit K=8 and K=64 are compared with PEFT's for the same requests, and the merged
model's with lorakit K=1 (all a0).

Writes bench/results/serve.md and bench/results/serve.json (serve.all-linear.* with --targets all-linear).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "smollm2-135m"
KS = (1, 8, 64)
N_ADAPTERS = 64
E2E = ROOT.parent / "shared" / "data" / "e2e"
FALLBACK = ["name : The Eagle | eatType : coffee shop | food : French | area : riverside",
            "name : Zizzi | eatType : pub | customer rating : high | familyFriendly : yes",
            "name : The Mill | food : Italian | priceRange : cheap | area : city centre",
            "name : Cotto | eatType : restaurant | food : Indian | near : Café Sicilia"]


# --- setup ------------------------------------------------------------------------------------------------------------
def check_sitecustomize():
    """Warn when a sitecustomize.py in the venv sets OMP_NUM_THREADS (it would skew every timing)."""
    for d in sys.path:
        f = Path(d) / "sitecustomize.py"
        if f.is_file() and "OMP_NUM_THREADS" in f.read_text(errors="replace"):
            print(f"warning: {f} sets OMP_NUM_THREADS; the timings are not comparable", flush=True)
            return str(f)
    return None


def make_adapters(work: Path, targets, b_std: float, seed: int) -> tuple[Path, Path]:
    """a0..a63 as lorakit files in work/lorakit and PEFT folders in work/peft."""
    import lorakit
    from lorakit.core.model import lora_modules
    from lorakit.llm import pretrained

    lk, pf = work / "lorakit", work / "peft"
    lk.mkdir()
    pf.mkdir()
    model, _, _ = pretrained.load(MODEL)
    torch.manual_seed(seed)
    for i in range(N_ADAPTERS):
        name = f"a{i}"
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=targets, init=False), name=name)
        with torch.no_grad():
            for m in lora_modules(model).values():
                if hasattr(m, "lora_B") and name in m.lora_B:
                    m.lora_B[name].normal_(0, b_std)
        lorakit.save(model, lk / f"{name}.safetensors", name=name, base_model=MODEL)
        lorakit.save(model, pf / name, name=name, base_model=MODEL, format="peft")
        lorakit.delete(model, name)
    return lk, pf


def make_requests(n: int, lo: int, hi: int, seed: int) -> list[dict]:
    """The fixed request list: E2E meaning representations as prompts, max_tokens in [lo, hi]."""
    mrs = []
    for split in ("test.txt", "valid.txt"):
        f = E2E / split
        if f.is_file():
            mrs += [line.split("||")[0].strip() for line in f.read_text().splitlines() if "||" in line]
    mrs = sorted(set(mrs)) or FALLBACK
    rng = random.Random(seed)
    return [{"prompt": f"Describe this restaurant in one sentence.\n{rng.choice(mrs)}\n",
             "max_tokens": rng.randint(lo, hi)} for _ in range(n)]


# --- lorakit over HTTP ------------------------------------------------------------------------------------------------
class Server:
    """`lorakit serve ...` in its own process on a free loopback port (as tests/test_serve.py starts it)."""

    def __init__(self, *args, threads: int):
        import openai

        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--port", "0", "--device", "cpu",
                                      *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        deadline, self.log = time.time() + 600, []
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
            raise RuntimeError("server did not start in 600 s:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=900)

    def _drain(self):
        for line in self.proc.stdout:  # keep its pipe drained, and keep what it says (errors)
            self.log.append(line)

    def steps(self) -> float:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/metrics", timeout=30) as r:
            text = r.read().decode()
        return float(dict(line.split() for line in text.splitlines())["lorakit_engine_steps_total"])

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_http(server: Server, requests: list[dict], models: list[str], clients: int, deadline: float) -> dict:
    """Closed loop: `clients` threads take the next request from the list when their previous one returned."""
    lock, nxt = threading.Lock(), iter(range(len(requests)))
    done: dict[int, dict] = {}
    errors: list[str] = []

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None or time.perf_counter() > deadline:
                return
            q = requests[i]
            t = time.perf_counter()
            try:
                out = server.client.completions.create(model=models[i], prompt=q["prompt"], max_tokens=q["max_tokens"],
                                                       temperature=0, extra_body={"ignore_eos": True})
            except Exception as e:  # noqa: BLE001 - counted, reported
                errors.append(f"request {i}: {type(e).__name__}: {e}")
                continue
            done[i] = {"latency": time.perf_counter() - t, "tokens": out.usage.completion_tokens,
                       "text": out.choices[0].text}

    steps0 = server.steps()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    return summarize(done, wall, len(requests), errors, steps=server.steps() - steps0)


# --- PEFT in-process --------------------------------------------------------------------------------------------------
class Peft:
    """SmolLM2 (fp32, as the server loads it) with the 64 PEFT adapters loaded."""

    def __init__(self, folders: Path):
        from peft import PeftModel

        from lorakit.llm import pretrained

        base, self.tok, _ = pretrained.load(MODEL)
        self.tok.padding_side = "left"
        names = [f"a{i}" for i in range(N_ADAPTERS)]
        self.model = PeftModel.from_pretrained(base, str(folders / names[0]), adapter_name=names[0])
        for n in names[1:]:
            self.model.load_adapter(str(folders / n), adapter_name=n)
        self.model.eval()

    @torch.inference_mode()
    def generate(self, prompts: list[str], names: list[str], max_new: int) -> tuple[torch.Tensor, int]:
        enc = self.tok(prompts, return_tensors="pt", padding=True)
        out = self.model.generate(**enc, adapter_names=names, max_new_tokens=max_new, min_new_tokens=max_new,
                                  do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=None,
                                  pad_token_id=self.tok.pad_token_id)
        return out, enc["input_ids"].shape[1]


def run_peft(peft: Peft, requests: list[dict], models: list[str], batch: int, deadline: float) -> dict:
    """The request list in order as static batches; each request counts its own max_tokens."""
    done: dict[int, dict] = {}
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch):
        if time.perf_counter() > deadline:
            break
        idx = list(range(start, min(start + batch, len(requests))))
        mx = max(requests[i]["max_tokens"] for i in idx)
        tb = time.perf_counter()
        out, width = peft.generate([requests[i]["prompt"] for i in idx], [models[i] for i in idx], mx)
        lat = time.perf_counter() - tb
        if out.shape[1] - width != mx:
            raise RuntimeError(f"PEFT generated {out.shape[1] - width} tokens, wanted {mx}")
        for row, i in enumerate(idx):
            n = requests[i]["max_tokens"]
            done[i] = {"latency": lat, "tokens": n,
                       "text": peft.tok.decode(out[row, width: width + n], skip_special_tokens=True)}
    return summarize(done, time.perf_counter() - t0, len(requests), [])


# --- the measuring ----------------------------------------------------------------------------------------------------
def summarize(done: dict[int, dict], wall: float, wanted: int, errors: list[str], steps: float | None = None) -> dict:
    lat = sorted(d["latency"] for d in done.values())
    tokens = sum(d["tokens"] for d in done.values())
    pct = lambda p: lat[min(len(lat) - 1, round(p * (len(lat) - 1)))] if lat else None
    out = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else None, "p50_s": pct(0.5),
           "p95_s": pct(0.95), "requests_done": len(done), "requests_wanted": wanted, "errors": errors[:5],
           "texts": {i: d["text"] for i, d in sorted(done.items())}}
    if steps is not None:
        out.update(engine_steps=steps, tokens_per_step=tokens / steps if steps else None)
    return out


SCENARIOS = [("lorakit", 1), ("lorakit", 8), ("lorakit", 64), ("merged", 1), ("peft", 1), ("peft", 8), ("peft", 64)]


def label(kind: str, k: int) -> str:
    return {"lorakit": f"lorakit K={k}", "merged": "merged model (a0), no LoRA", "peft": f"PEFT K={k}"}[kind]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def measure(args, requests, lk_server, merged_server, peft, t_start) -> tuple[dict, list]:
    cap = t_start + args.time_cap
    runs = {label(*s): [] for s in SCENARIOS}
    skipped = []
    for rnd in range(args.rounds):
        order = SCENARIOS[rnd % len(SCENARIOS):] + SCENARIOS[: rnd % len(SCENARIOS)]
        for kind, k in order:
            name = label(kind, k)
            if time.perf_counter() > cap:
                skipped.append(f"round {rnd + 1}: {name}")
                continue
            models = ["base"] * len(requests) if kind == "merged" else [f"a{i % k}" for i in range(len(requests))]
            if kind == "peft":
                r = run_peft(peft, requests, models, args.clients, cap)
            else:
                r = run_http(lk_server if kind == "lorakit" else merged_server, requests, models, args.clients, cap)
            r["round"] = rnd + 1
            runs[name].append(r)
            print(f"round {rnd + 1}  {name:28s} {r['tokens_per_s']:7.1f} tok/s  p50 {r['p50_s']:6.2f} s  "
                  f"p95 {r['p95_s']:6.2f} s  {r['requests_done']}/{r['requests_wanted']} requests  "
                  f"{r['wall_s']:6.1f} s" + (f"  {r['tokens_per_step']:.1f} tok/step" if r.get('tokens_per_step')
                                              else "") + (f"  ERRORS {r['errors']}" if r["errors"] else ""),
                  flush=True)
    return runs, skipped


def round_ratio(runs: dict, num: str, den: str) -> list[float]:
    by_round = {r["round"]: r["tokens_per_s"] for r in runs[den] if r["requests_done"] == r["requests_wanted"]}
    return [r["tokens_per_s"] / by_round[r["round"]] for r in runs[num]
            if r["round"] in by_round and r["requests_done"] == r["requests_wanted"]]


def agreement(a: dict, b: dict) -> dict:
    """How many requests got the same greedy text from both runs (and the same first 8 words)."""
    both = sorted(set(a) & set(b))
    same = sum(a[i].strip() == b[i].strip() for i in both)
    start = sum(a[i].split()[:8] == b[i].split()[:8] for i in both)
    return {"compared": len(both), "identical": same, "same_first_8_words": start}


def report(args, requests, runs, skipped, wall, setup_s, sanity, sitecustom) -> tuple[str, dict]:
    base = med([r["tokens_per_s"] for r in runs["lorakit K=1"]])
    rows = []
    for kind, k in SCENARIOS:
        name = label(kind, k)
        rs = runs[name]
        full = [r for r in rs if r["requests_done"] == r["requests_wanted"]]
        tps = med([r["tokens_per_s"] for r in full])
        rows.append({"scenario": name, "transport": "in-process" if kind == "peft" else "HTTP, loopback",
                     "rounds": len(full), "tokens_per_s": tps, "p50_s": med([r["p50_s"] for r in full]),
                     "p95_s": med([r["p95_s"] for r in full]),
                     "ratio_to_lorakit_k1": tps / base if tps and base else None,
                     "tokens_per_step": med([r.get("tokens_per_step") for r in full])})
    f = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"
    lines = ["| scenario | transport | tokens/s | p50 s | p95 s | × lorakit K=1 | tokens/engine step | rounds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['transport']} | {f(r['tokens_per_s'])} | {f(r['p50_s'], 2)} | "
                     f"{f(r['p95_s'], 2)} | {f(r['ratio_to_lorakit_k1'], 2)} | {f(r['tokens_per_step'])} | "
                     f"{r['rounds']} |")
    goals = []
    for text, num, den, bar in [("64 adapters / 1 adapter (lorakit)", "lorakit K=64", "lorakit K=1", 0.8),
                                ("lorakit mixed batch / PEFT adapter_names, K=64", "lorakit K=64", "PEFT K=64", 2.0),
                                ("lorakit mixed batch / PEFT adapter_names, K=8", "lorakit K=8", "PEFT K=8", 2.0)]:
        ratios = round_ratio(runs, num, den)
        m = med(ratios)
        verdict = "–" if m is None else ("PASS" if m >= bar else "MISS")
        goals.append({"goal": text, "target": bar, "median_ratio": m, "per_round": ratios, "verdict": verdict})
        lines.append("")
        lines.append(f"- {text} ≥ {bar}: **{f(m, 2)}** (per round: {', '.join(f'{x:.2f}' for x in ratios)}) "
                     f"**{verdict}**")
    md = "\n".join(lines)
    targets = "q_proj,v_proj" if args.targets == "qv" else "all-linear"
    mean_tokens = statistics.mean(q["max_tokens"] for q in requests)
    notes = [
        (f"SmolLM2-135M-Instruct fp32 on CPU ({torch.get_num_threads()} torch threads here, OMP_NUM_THREADS="
         f"{args.threads} in the servers); adapters r=8 alpha=16 on {targets}, B ~ N(0, {args.b_std}). "
         f"{len(requests)} requests (E2E meaning representations), max_tokens {args.min_tokens}..{args.max_tokens} "
         f"(mean {mean_tokens:.1f}), temperature 0, EOS ignored; {args.clients} concurrent clients, "
         f"`--max-batch {args.max_batch}`; request i uses adapter a(i mod K)."),
        (f"Medians over {args.rounds} interleaved rounds (the goal ratios: medians of the per-round ratios). "
         "lorakit and the merged model are served over HTTP on loopback (the 16 client threads share the machine's "
         "cores with the server); PEFT runs in-process with no HTTP, as static batches of "
         f"{args.clients} in request order with max_new_tokens = the batch's largest max_tokens: it computes the "
         "longest row's tokens for every row but only each request's own max_tokens are counted; its latency is the "
         "batch's wall time (all 16 requests of a batch arrive together). tokens/engine step: completion tokens over "
         "the server's engine steps (decode steps and prefill steps of the joining requests)."),
        (f"Sanity (greedy texts, same requests): lorakit K=8 vs PEFT K=8 {sanity['k8']['identical']}/"
         f"{sanity['k8']['compared']} identical ({sanity['k8']['same_first_8_words']} with the same first 8 words); "
         f"K=64 {sanity['k64']['identical']}/{sanity['k64']['compared']} "
         f"({sanity['k64']['same_first_8_words']}); merged model vs lorakit K=1 (both a0) "
         f"{sanity['merged']['identical']}/{sanity['merged']['compared']} "
         f"({sanity['merged']['same_first_8_words']}). The adapters do change the text: lorakit K=8 differs from K=1 "
         f"in {sanity['k8_vs_k1_differ']} of the {sanity['k8_vs_k1_other_adapter']} requests whose adapter is not a0."),
        (f"Wall time {wall:.0f} s ({setup_s:.0f} s of it making adapters, merging, starting servers and loading PEFT); "
         f"torch {torch.__version__}, peft {sanity['peft_version']}, {os.cpu_count()} CPUs."
         + (f" Skipped by the --time-cap of {args.time_cap} s: {'; '.join(skipped)}." if skipped else "")
         + (f" WARNING: {sitecustom} sets OMP_NUM_THREADS." if sitecustom else "")),
    ]
    if "example" in sanity:
        e = sanity["example"]
        notes.append(f"Example (request {e['request']}, adapter {e['adapter']}): lorakit {e['lorakit']!r}; "
                     f"PEFT {e['peft']!r}.")
    result = {"setup": {"model": MODEL, "targets": targets, "r": 8, "alpha": 16, "b_std": args.b_std,
                        "requests": len(requests), "max_tokens": [args.min_tokens, args.max_tokens],
                        "clients": args.clients, "max_batch": args.max_batch, "rounds": args.rounds,
                        "time_cap_s": args.time_cap, "seed": args.seed, "torch": torch.__version__,
                        "peft": sanity["peft_version"], "cpus": os.cpu_count(), "wall_s": wall, "setup_s": setup_s,
                        "skipped": skipped, "sitecustomize_sets_omp": sitecustom},
              "table": rows, "goals": goals, "sanity": sanity,
              "runs": {n: [{k: v for k, v in r.items() if k != "texts"} for r in rs] for n, rs in runs.items()}}
    return md + "\n\n" + "\n\n".join(notes) + "\n", result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48, help="requests per scenario")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (and PEFT's static batch size)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all scenarios")
    p.add_argument("--targets", choices=["qv", "all-linear"], default="qv")
    p.add_argument("--b-std", type=float, default=0.01, help="std of the adapters' random B")
    p.add_argument("--time-cap", type=float, default=900, help="seconds of measuring, then it stops")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the servers and of PEFT (1: on a shared, "
                   "busy machine 2 OpenMP threads per process oversubscribe the cores and a step gets ~10x slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(HERE / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still stops the servers
    import peft as peft_lib

    sitecustom = check_sitecustomize()
    t0 = time.perf_counter()
    requests = make_requests(args.requests, args.min_tokens, args.max_tokens, args.seed)
    targets = ["q_proj", "v_proj"] if args.targets == "qv" else "all-linear"
    servers = []
    with tempfile.TemporaryDirectory(prefix="lorakit-serve-bench-") as tmp:
        work = Path(tmp)
        try:
            print("making 64 adapters ...", flush=True)
            lk_dir, peft_dir = make_adapters(work, targets, args.b_std, args.seed)
            print("merging a0 ...", flush=True)
            subprocess.run([sys.executable, "-m", "lorakit.cli", "merge-into", "--model", MODEL, "--adapter",
                            str(lk_dir / "a0.safetensors"), "--out", str(work / "merged")], check=True,
                           stdout=subprocess.DEVNULL)
            print("starting the servers ...", flush=True)
            common = ["--max-batch", args.max_batch, "--max-queue", max(64, args.clients)]
            lk_server = Server("--model", MODEL, "--adapter-dir", lk_dir, *common, threads=args.threads)
            servers.append(lk_server)
            merged_server = Server("--model", work / "merged", *common, threads=args.threads)
            servers.append(merged_server)
            print("loading PEFT with 64 adapters ...", flush=True)
            peft = Peft(peft_dir)
            # warm-up (not timed): one short request each
            lk_server.client.completions.create(model="a1", prompt="Hello", max_tokens=4, temperature=0)
            merged_server.client.completions.create(model="base", prompt="Hello", max_tokens=4, temperature=0)
            peft.generate(["Hello", "Hi there"], ["a0", "a1"], 4)
            setup_s = time.perf_counter() - t0
            print(f"setup {setup_s:.0f} s; measuring", flush=True)
            runs, skipped = measure(args, requests, lk_server, merged_server, peft, time.perf_counter())
        finally:
            for s in servers:
                s.close()
    wall = time.perf_counter() - t0

    first = lambda name: runs[name][0]["texts"] if runs[name] else {}
    sanity = {"peft_version": peft_lib.__version__,
              "k8": agreement(first("lorakit K=8"), first("PEFT K=8")),
              "k64": agreement(first("lorakit K=64"), first("PEFT K=64")),
              "merged": agreement(first("merged model (a0), no LoRA"), first("lorakit K=1"))}
    k1, k8 = first("lorakit K=1"), first("lorakit K=8")  # the adapters do differ: a(i mod 8) vs a0
    sanity["k8_vs_k1_differ"] = sum(k1[i].strip() != k8[i].strip() for i in set(k1) & set(k8) if i % 8)
    sanity["k8_vs_k1_other_adapter"] = sum(1 for i in set(k1) & set(k8) if i % 8)
    a, b = first("lorakit K=8"), first("PEFT K=8")
    if 3 in a and 3 in b:
        sanity["example"] = {"request": 3, "adapter": "a3", "prompt": requests[3]["prompt"], "lorakit": a[3],
                             "peft": b[3]}
    md, result = report(args, requests, runs, skipped, wall, setup_s, sanity, sitecustom)
    print()
    print(md)
    stem = "serve" if args.targets == "qv" else "serve.all-linear"
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    title = "q_proj,v_proj" if args.targets == "qv" else "all-linear"
    (dest / f"{stem}.md").write_text(f"# Serving many adapters: lorakit serve vs a merged model vs PEFT adapter_names, "
                                     f"r=8 on {title} (bench/serve.py)\n\n{md}")
    (dest / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {dest / (stem + '.md')} and {dest / (stem + '.json')}")


if __name__ == "__main__":
    main()
