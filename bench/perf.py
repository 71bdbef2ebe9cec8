"""How close lorakit is to the physical limit (issue 13): training-step time, inference time, peak memory, adapter
loading/switching and hot-swapping under torch.compile, each against the frozen base model and against PEFT.

    OMP_NUM_THREADS=2 .venv/bin/python bench/perf.py                        # every section, fp32 (long: ~20 min)
    OMP_NUM_THREADS=2 .venv/bin/python bench/perf.py --dtypes fp32,bf16     # speed rows in bf16 too
    OMP_NUM_THREADS=2 .venv/bin/python bench/perf.py --sections speed --rounds 11
    OMP_NUM_THREADS=2 .venv/bin/python bench/perf.py --quick                # 2 rounds, few repeats: a debugging look
    OMP_NUM_THREADS=2 .venv/bin/python bench/perf.py --sections hotswap --compile-backend aot_eager

Model: SmolLM2-135M (fp32, 30 layers), a seeded random batch of --batch x --seq token ids, --threads torch threads.
The machine is noisy, so the models compared live side by side in one process and run in --rounds interleaved
rounds (a shuffled order each round, warm-up steps first); a ratio is the median over rounds of that round's ratio.
Training speed runs one group per configuration (frozen, lorakit, its reference path, PEFT), so that only a few
model copies are in memory at once (with all eleven at once, steps ran slower and noisier).
Adapters get a non-zero B (N(0, --b-std)) in lorakit and PEFT alike.

    speed     a train step = forward with labels=ids + loss.backward() (no optimizer, grads set to None after).
              frozen = the base with every parameter frozen but the input embedding's output requiring grad, so
              backward runs through every layer: the arithmetic floor any LoRA pays. Rows: lorakit (fast path, the
              default) / frozen, lorakit reference path (lorakit.core.layers.use_fast(False)) / frozen, PEFT / frozen
              and lorakit / PEFT for all-linear r8 dropout 0.05, all-linear r8 dropout 0, q,v r8 dropout 0 (alpha 16),
              and lorakit all-linear r8 dropout 0.05 with LoraConfig(fast_dropout=True). Inference (eval, under
              torch.inference_mode): lorakit unmerged all-linear r8 / base, PEFT / base, lorakit merged / base.
    memory    one child process per configuration (this script with --child memory --config NAME): AdamW over the
              trainable parameters (none for frozen), 2 warm-up steps, then the peak RSS (VmHWM after resetting it
              through /proc/self/clear_refs) of one more step, with MALLOC_MMAP_THRESHOLD_=65536 so that glibc gives
              freed blocks back and RSS follows the live tensors; and the bytes autograd saves for backward in one
              forward (non-parameter storages, counted once).
    load      lorakit.load of an all-linear r8 adapter (210 modules) onto a fresh base, loading a second one,
              set_weights switching between the two (and whether any parameter's storage moves), vs PEFT's
              PeftModel.from_pretrained, load_adapter, set_adapter.
    hotswap   lorakit.prepare_hotswap(model, 16) + torch.compile: compile time, compiled / eager forward, and after
              loading adapters of rank 4/8/16 and weighted stacks: new graphs and frames (re)compiled (goal 0:
              counters["stats"]["unique_graphs"], counters["frames"]["total"], which also counts recompile-limit hits)
              and the largest |compiled - eager| logit difference relative to max |eager|.
    gpu       with CUDA only: the speed rows in bf16 on the GPU, with each model's peak step memory
              (max_memory_allocated) against frozen's.

Goals (issue 13): train all-linear d0.05 <= 1.15 x frozen and <= 0.85 x PEFT; all-linear d0 <= 1.06; q,v <= 1.02;
unmerged inference <= 1.04 x base; lorakit all-linear peak RSS <= 1.05 x frozen; no recompiles after hot swaps.
Writes bench/results/perf.md and bench/results/perf.json (perf.quick.* with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import flags, report, run_child

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
QV = ["q_proj", "v_proj"]
CONFIGS = {"all-linear r8 d0.05": ("all-linear", 0.05), "all-linear r8 d0": ("all-linear", 0.0),
           "q,v r8 d0": (QV, 0.0)}
TRAIN_GOAL = {"all-linear r8 d0.05": 1.15, "all-linear r8 d0": 1.06, "q,v r8 d0": 1.02}
FD = "all-linear r8 d0.05 fast_dropout"
MEMORY = {  # child config -> (kind, targets, dropout, fast, extra LoraConfig fields)
    "frozen": ("frozen", None, 0.0, None, {}),
    "lorakit all-linear d0.05": ("lorakit", "all-linear", 0.05, True, {}),
    "lorakit all-linear d0.05 reference": ("lorakit", "all-linear", 0.05, False, {}),
    "lorakit all-linear d0.05 fast_dropout": ("lorakit", "all-linear", 0.05, True, {"fast_dropout": True}),
    "PEFT all-linear d0.05": ("peft", "all-linear", 0.05, None, {}),
    "lorakit q,v d0": ("lorakit", QV, 0.0, True, {}),
    "full fine-tuning": ("full", None, 0.0, None, {}),
}
SECTIONS = ("speed", "memory", "load", "hotswap", "gpu")


@contextlib.contextmanager
def path(fast: bool | None):
    """Run lorakit on its fast path (True), its reference path (False), or leave it as it is (None)."""
    from lorakit.core.layers import use_fast
    if fast is None:
        yield
        return
    use_fast(fast)
    try:
        yield
    finally:
        use_fast(True)


# --- models ---------------------------------------------------------------------------------------------------------------
def load_base():
    from lorakit.llm import pretrained
    model, _, _ = pretrained.load(MODEL)
    return model


def make_batch(args, model, device="cpu"):
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)


def random_b(model, std: float, seed: int):
    """Every lora_B ~ N(0, std), so no adapter is trivially zero (lorakit and PEFT name them alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * std)
    return model


def make_frozen(m):
    """Every parameter frozen; the embedding output requires grad so that backward still runs through every layer."""
    m.requires_grad_(False)
    m.get_input_embeddings().register_forward_hook(
        lambda mod, i, o: o.requires_grad_(True) if torch.is_grad_enabled() else None)
    return m.train()


def make_lorakit(m, targets, dropout, fast=True, std=0.01, seed=1, r=8, **extra):
    import lorakit
    with path(fast):
        lorakit.inject(m, lorakit.LoraConfig(r=r, alpha=16, dropout=dropout, targets=targets, **extra))
    return random_b(m, std, seed).train()


def make_peft(m, targets, dropout, std=0.01, seed=1):
    import peft
    m = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets))
    return random_b(m, std, seed).train()


# --- timing ---------------------------------------------------------------------------------------------------------------
def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def train_step(m, ids, fast, device, peaks=None, key=None) -> float:
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with path(fast):
        sync(device)
        t = time.perf_counter()
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        sync(device)
        dt = time.perf_counter() - t
    if cuda and peaks is not None:
        peaks[key] = (torch.cuda.max_memory_allocated() - before) / 2**20
    for p in m.parameters():
        p.grad = None
    return dt


def infer(m, ids, device) -> float:
    with torch.inference_mode():
        sync(device)
        t = time.perf_counter()
        m(input_ids=ids, use_cache=False)
        sync(device)
        return time.perf_counter() - t


def interleave(fns: dict, rounds: int, warmup: int, rng: random.Random) -> dict[str, list[float]]:
    """Warm-up calls of each, then `rounds` rounds of one call each in a shuffled order; the times per name."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for i in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            times[k].append(fns[k]())
        print(f"  round {i + 1}/{rounds}: " + ", ".join(f"{k} {times[k][-1]:.3f}s" for k in fns), flush=True)
    return times


def ratio(times, num, den) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


# --- rows -----------------------------------------------------------------------------------------------------------------
class Rows(list):
    def add(self, section, name, value=None, text=None, goal=None, skip=None):
        """goal: ("<=", x) or ("==", x); skip: why there is no value."""
        if skip is not None:
            status, text = "skipped", skip
        elif goal is None:
            status = "–"
        else:
            status = "met" if (value <= goal[1] if goal[0] == "<=" else value == goal[1]) else "not met"
        goal_text = "–" if goal is None else f"{'≤' if goal[0] == '<=' else '='} {goal[1]:g}"
        text = text if text is not None else f"{value:.3f}"
        self.append(dict(section=section, row=name, value=value, text=text, goal=goal_text, status=status))
        print(f"[{section}] {name}: {text}  (goal {goal_text}: {status})", flush=True)

    def table(self) -> str:
        lines = ["| section | row | value | goal | status |", "|---|---|---:|---|---|"]
        lines += [f"| {r['section']} | {r['row']} | {r['text']} | {r['goal']} | {r['status']} |" for r in self]
        return "\n".join(lines)


# --- speed (and gpu) ------------------------------------------------------------------------------------------------------
def speed(args, base, rows: Rows, dtype, device, section) -> dict:
    import lorakit

    tag = f"{section} {({torch.float32: 'fp32', torch.bfloat16: 'bf16'}).get(dtype, dtype)}"
    print(f"\n== {tag}: train steps and inference forwards on {device}", flush=True)
    m0 = copy.deepcopy(base).to(device=device, dtype=dtype)
    ids = make_batch(args, m0, device)
    clone = lambda: copy.deepcopy(m0)
    frozen = make_frozen(clone())
    peaks, out = {}, {"train_median_s": {}, "train_s": {}}
    # one group of models per configuration, each interleaved with the frozen base: a few models in memory at a time
    for gi, (c, (targets, p)) in enumerate(CONFIGS.items()):
        models = {"frozen": (frozen, None),
                  f"lorakit {c}": (make_lorakit(clone(), targets, p, fast=True, std=args.b_std), True)}
        models[f"lorakit {c} reference"] = (make_lorakit(clone(), targets, p, fast=False, std=args.b_std), False)
        models[f"PEFT {c}"] = (make_peft(clone(), targets, p, std=args.b_std), None)
        if c == "all-linear r8 d0.05":
            models[f"lorakit {FD}"] = (make_lorakit(clone(), "all-linear", 0.05, fast=True, std=args.b_std,
                                                    fast_dropout=True), True)
        fns = {k: (lambda m=m, f=f, k=k: train_step(m, ids, f, device, peaks, k)) for k, (m, f) in models.items()}
        times = interleave(fns, args.rounds, args.warmup, random.Random(args.seed + gi))
        for k, v in times.items():
            key = f"frozen ({c})" if k == "frozen" else k
            out["train_s"][key], out["train_median_s"][key] = v, statistics.median(v)
        if gi == 0:
            rows.add(section, f"train {tag}: frozen s/step", statistics.median(times["frozen"]),
                     text=f"{statistics.median(times['frozen']):.3f} s")
        rows.add(section, f"train {tag}: lorakit {c} / frozen", ratio(times, f"lorakit {c}", "frozen"),
                 goal=("<=", TRAIN_GOAL[c]))
        rows.add(section, f"train {tag}: lorakit {c} reference path / frozen",
                 ratio(times, f"lorakit {c} reference", "frozen"))
        rows.add(section, f"train {tag}: PEFT {c} / frozen", ratio(times, f"PEFT {c}", "frozen"))
        rows.add(section, f"train {tag}: lorakit {c} / PEFT", ratio(times, f"lorakit {c}", f"PEFT {c}"),
                 goal=("<=", 0.85) if c == "all-linear r8 d0.05" else None)
        if f"lorakit {FD}" in models:
            rows.add(section, f"train {tag}: lorakit {FD} / frozen", ratio(times, f"lorakit {FD}", "frozen"),
                     goal=("<=", TRAIN_GOAL["all-linear r8 d0.05"]))
            rows.add(section, f"train {tag}: lorakit {FD} / PEFT all-linear r8 d0.05",
                     ratio(times, f"lorakit {FD}", "PEFT all-linear r8 d0.05"), goal=("<=", 0.85))
        del models, fns
        gc.collect()
    if peaks:
        out["train_peak_mib"] = dict(peaks)
        for k, v in peaks.items():
            rows.add(section, f"train {tag}: peak step memory {k} / frozen", v / peaks["frozen"],
                     text=f"{v:.0f} MiB = {v / peaks['frozen']:.3f}x")
    del frozen
    gc.collect()

    inf = {"base": m0.eval().requires_grad_(False),
           "lorakit unmerged": make_lorakit(clone(), "all-linear", 0.05, std=args.b_std).eval(),
           "PEFT unmerged": make_peft(clone(), "all-linear", 0.05, std=args.b_std).eval(),
           "lorakit merged": lorakit.merge(make_lorakit(clone(), "all-linear", 0.05, std=args.b_std).eval())}
    times = interleave({k: (lambda m=m: infer(m, ids, device)) for k, m in inf.items()}, args.rounds, args.warmup,
                       random.Random(args.seed + 1))
    out.update(infer_median_s={k: statistics.median(v) for k, v in times.items()}, infer_s=times)
    rows.add(section, f"infer {tag}: base s/forward", out["infer_median_s"]["base"],
             text=f"{out['infer_median_s']['base']:.3f} s")
    rows.add(section, f"infer {tag}: lorakit all-linear r8 unmerged / base", ratio(times, "lorakit unmerged", "base"),
             goal=("<=", 1.04))
    rows.add(section, f"infer {tag}: PEFT all-linear r8 unmerged / base", ratio(times, "PEFT unmerged", "base"))
    rows.add(section, f"infer {tag}: lorakit unmerged / PEFT unmerged", ratio(times, "lorakit unmerged", "PEFT unmerged"))
    rows.add(section, f"infer {tag}: lorakit merged / base", ratio(times, "lorakit merged", "base"))
    del inf
    gc.collect()
    return out


# --- memory ---------------------------------------------------------------------------------------------------------------
def proc_status(key: str) -> float:
    """A /proc/self/status field (kB) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def saved_for_backward_mib(m, ids, fast) -> float:
    """MiB that autograd keeps for backward in one forward: every saved non-parameter storage, once."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with path(fast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
    del loss
    return sum(seen.values()) / 2**20


def memory_child(args) -> dict:
    torch.set_num_threads(args.threads)
    kind, targets, dropout, fast, extra = MEMORY[args.config]
    m = load_base()  # set up in place: no second copy in this process
    if kind == "frozen":
        m = make_frozen(m)
    elif kind == "lorakit":
        m = make_lorakit(m, targets, dropout, fast=fast, std=args.b_std, **extra)
    elif kind == "peft":
        m = make_peft(m, targets, dropout, std=args.b_std)
    else:
        m = m.requires_grad_(True).train()
    trainable = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5) if kind != "frozen" else None
    ids = make_batch(args, m)

    def step():
        with path(fast):
            m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if opt is not None:
            opt.step()
        for p in trainable:
            p.grad = None

    for _ in range(2):
        step()
    gc.collect()
    rss_before = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t = time.perf_counter()
    step()
    step_s = time.perf_counter() - t
    peak = proc_status("VmHWM")
    return {"config": args.config, "step_peak_mib": peak, "rss_before_step_mib": rss_before, "step_s": step_s,
            "saved_for_backward_mib": saved_for_backward_mib(m, ids, fast),
            "trainable_params": sum(p.numel() for p in trainable)}


def memory(args, rows: Rows) -> dict:
    print("\n== memory: one child process per configuration", flush=True)
    # glibc keeps freed blocks above its (adaptive) mmap threshold for reuse, so RSS would keep what the warm-up steps
    # freed; a fixed threshold returns every large block at once and the peak RSS follows the live tensors
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    found = {}
    for name in MEMORY:
        found[name] = run_child(__file__, ["--child", "memory", "--config", name,
                                           *flags(args, ["threads", "batch", "seq", "seed", "b_std"])])
        found[name].pop("process_wall_s", None)
    frozen = found["frozen"]["step_peak_mib"]
    for name, r in found.items():
        x = r["step_peak_mib"] / frozen
        rows.add("memory", f"{name}: step peak RSS / frozen", x, goal=("<=", 1.05) if name ==
                 "lorakit all-linear d0.05" else None, text=f"{r['step_peak_mib']:.0f} MiB = {x:.3f}x (+{r['step_peak_mib'] - r['rss_before_step_mib']:.0f} "
                 f"over the RSS before the step); saved for backward {r['saved_for_backward_mib']:.0f} MiB")
    return found


# --- load and switch -----------------------------------------------------------------------------------------------------
def ms(f) -> float:
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1000


def load_switch(args, base, rows: Rows, work: Path) -> dict:
    import lorakit
    import peft
    from lorakit.core.model import lora_modules

    print("\n== load: loading and switching all-linear r8 adapters", flush=True)
    src = make_lorakit(copy.deepcopy(base), "all-linear", 0.05, std=args.b_std)
    n_modules = len(lora_modules(src))
    files = {}
    for i, name in enumerate("ab"):
        random_b(src, args.b_std, 10 + i)
        files[name] = lorakit.save(src, work / f"{name}.safetensors", name="default", base_model=MODEL)
    psrc = make_peft(copy.deepcopy(base), "all-linear", 0.05, std=args.b_std)
    for i, name in enumerate("ab"):
        random_b(psrc, args.b_std, 10 + i)
        psrc.save_pretrained(str(work / f"peft-{name}"))
    del src, psrc
    out = {"modules": n_modules}

    def fresh_loads(load):
        times, model = [], None
        for _ in range(args.load_reps):
            fresh = copy.deepcopy(base)
            holder = {}
            times.append(ms(lambda: holder.setdefault("m", load(fresh))))
            model = holder["m"]
        return statistics.median(times), model

    def second_loads(load, unload):
        times = []
        for i in range(args.load_reps):
            if i:
                unload()
            times.append(ms(load))
        return statistics.median(times)

    def switches(switch, names, model):
        times = [ms(lambda i=i: switch(names[i % 2])) for i in range(args.switch_reps)]
        ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
        for i in range(10):
            switch(names[i % 2])
        moved = sum(p.data_ptr() != ptrs.get(n) for n, p in model.named_parameters())
        return statistics.median(times), moved

    out["lorakit_load_ms"], lk = fresh_loads(lambda m: (lorakit.load(m, files["a"], name="a"), m)[1])
    out["lorakit_load_second_ms"] = second_loads(lambda: lorakit.load(lk, files["b"], name="b"),
                                                 lambda: lorakit.delete(lk, "b"))
    out["lorakit_switch_ms"], out["lorakit_moved_params"] = switches(lambda n: lorakit.set_weights(lk, n), "ab", lk)
    out["peft_load_ms"], pm = fresh_loads(lambda m: peft.PeftModel.from_pretrained(m, str(work / "peft-a")))
    out["peft_load_second_ms"] = second_loads(lambda: pm.load_adapter(str(work / "peft-b"), adapter_name="b"),
                                              lambda: pm.delete_adapter("b"))
    out["peft_switch_ms"], out["peft_moved_params"] = switches(pm.set_adapter, ["default", "b"], pm)
    gc.collect()
    for what, k in [("load onto a fresh base", "load"), ("load a second adapter", "load_second"),
                    ("switch between two", "switch")]:
        a, b = out[f"lorakit_{k}_ms"], out[f"peft_{k}_ms"]
        rows.add("load", f"{what} ({n_modules} modules): lorakit / PEFT", a / b,
                 text=f"{a:.2f} ms vs {b:.2f} ms = {a / b:.3f}x")
    rows.add("load", "lorakit set_weights switching: parameters whose storage moved", out["lorakit_moved_params"],
             text=str(out["lorakit_moved_params"]), goal=("==", 0))
    rows.add("load", "PEFT set_adapter switching: parameters whose storage moved", out["peft_moved_params"],
             text=str(out["peft_moved_params"]))
    return out


# --- hot swapping under torch.compile --------------------------------------------------------------------------------------
def hotswap(args, base, rows: Rows, work: Path) -> dict:
    import lorakit

    print(f"\n== hotswap: prepare_hotswap + torch.compile(backend={args.compile_backend!r})", flush=True)
    prepare = lorakit.prepare_hotswap
    from torch._dynamo.utils import counters

    files = {}
    for name, r, seed in [("a", 8, 20), ("b", 4, 21), ("c", 16, 22), ("d", 8, 23)]:
        src = make_lorakit(copy.deepcopy(base), "all-linear", 0.0, std=args.b_std, seed=seed, r=r)
        files[name] = lorakit.save(src, work / f"hot-{name}.safetensors", name="default", base_model=MODEL)
        del src
    m = copy.deepcopy(base).eval().requires_grad_(False)
    lorakit.load(m, files["a"], name="a")
    prepare(m, 16)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=args.compile_backend)
    ids = make_batch(args, m)
    graphs = lambda: counters["stats"]["unique_graphs"]
    frames = lambda: counters["frames"]["total"]  # (every cache miss: a compile, a recompile, a limit hit)
    recompiles = lambda: sum(counters["recompiles"].values()) if "recompiles" in counters else None
    out = {}
    with torch.no_grad():
        t = time.perf_counter()
        y = compiled(input_ids=ids, use_cache=False).logits
        out["compile_s"] = time.perf_counter() - t
        out["graphs_after_compile"] = graphs()
        ref = m(input_ids=ids, use_cache=False).logits
        out["diff_first"] = ((y - ref).abs().max() / ref.abs().max()).item()
        times = interleave({"compiled": lambda: ms(lambda: compiled(input_ids=ids, use_cache=False)) / 1000,
                            "eager": lambda: ms(lambda: m(input_ids=ids, use_cache=False)) / 1000},
                           args.rounds, args.warmup, random.Random(args.seed + 2))
        out["compiled_over_eager"] = ratio(times, "compiled", "eager")
        g0, f0, r0 = graphs(), frames(), recompiles()
        swaps = [("load r4 'b'", lambda: lorakit.load(m, files["b"], name="b")),
                 ("load r16 'c'", lambda: lorakit.load(m, files["c"], name="c")),
                 ("set_weights 'a'", lambda: lorakit.set_weights(m, "a")),
                 ("set_weights {a: 0.5, b: -1}", lambda: lorakit.set_weights(m, {"a": 0.5, "b": -1.0})),
                 ("load r8 'd'", lambda: lorakit.load(m, files["d"], name="d")),
                 ("set_weights {b: 1, d: 0.5}", lambda: lorakit.set_weights(m, {"b": 1.0, "d": 0.5})),
                 ("set_weights 'c'", lambda: lorakit.set_weights(m, "c"))]
        out["swaps"] = []
        for label, op in swaps:
            op()
            before, fb = graphs(), frames()
            yc = compiled(input_ids=ids, use_cache=False).logits
            ye = m(input_ids=ids, use_cache=False).logits
            out["swaps"].append({"swap": label, "new_graphs": graphs() - before, "new_frames": frames() - fb,
                                 "rel_diff": ((yc - ye).abs().max() / ye.abs().max()).item()})
            print(f"  {label}: {out['swaps'][-1]}", flush=True)
        out["new_graphs_after_swaps"] = graphs() - g0
        out["frames_compiled_after_swaps"] = frames() - f0
        out["recompiles_after_swaps"] = None if r0 is None else recompiles() - r0
    rows.add("hotswap", "first compiled forward (compile)", out["compile_s"], text=f"{out['compile_s']:.1f} s")
    rows.add("hotswap", "compiled / eager forward", out["compiled_over_eager"])
    rows.add("hotswap", f"new graphs after {len(swaps)} swaps", out["new_graphs_after_swaps"],
             text=str(out["new_graphs_after_swaps"]), goal=("==", 0))
    rows.add("hotswap", f"frames (re)compiled after {len(swaps)} swaps", out["frames_compiled_after_swaps"],
             text=str(out["frames_compiled_after_swaps"]), goal=("==", 0))
    if out["recompiles_after_swaps"] is not None:
        rows.add("hotswap", f"recompiles after {len(swaps)} swaps", out["recompiles_after_swaps"],
                 text=str(out["recompiles_after_swaps"]), goal=("==", 0))
    worst = max([out["diff_first"]] + [s["rel_diff"] for s in out["swaps"]])
    rows.add("hotswap", "max abs(compiled - eager) / max abs(eager) logits, over the swaps", worst, text=f"{worst:.2e}",
             goal=("<=", 1e-3))
    return out


# --- main -----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--dtypes", default="fp32", help="speed rows for these dtypes (fp32,bf16)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls of each model before the rounds")
    p.add_argument("--load-reps", type=int, default=5)
    p.add_argument("--switch-reps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--b-std", type=float, default=0.01, help="std of every adapter's random B")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor, aot_eager)")
    p.add_argument("--quick", action="store_true", help="2 rounds, 1 warm-up, few repeats; writes perf.quick.*")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--child", choices=["memory"], help=argparse.SUPPRESS)
    p.add_argument("--config", choices=list(MEMORY), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.load_reps, args.switch_reps = 2, 1, 2, 10
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        report(memory_child(args))
        return
    torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := set(sections) - set(SECTIONS):
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    started = time.perf_counter()
    rows, results = Rows(), {}
    base = load_base() if set(sections) - {"memory"} else None
    with tempfile.TemporaryDirectory(prefix="lorakit-perf-") as tmp:
        for s in sections:
            if s == "speed":
                results["speed"] = {d: speed(args, base, rows, dtypes[d], "cpu", "speed") for d in args.dtypes.split(",")}
            elif s == "memory":
                results["memory"] = memory(args, rows)
            elif s == "load":
                results["load"] = load_switch(args, base, rows, Path(tmp))
            elif s == "hotswap":
                results["hotswap"] = hotswap(args, base, rows, Path(tmp))
            elif s == "gpu":
                if torch.cuda.is_available():
                    results["gpu"] = speed(args, base, rows, torch.bfloat16, "cuda", "gpu")
                else:
                    print("gpu: skipped (no CUDA)", flush=True)
                    rows.add("gpu", "bf16 speed and peak memory on CUDA", skip="skipped (no CUDA)")
                    results["gpu"] = {"skipped": "no CUDA"}
    total = time.perf_counter() - started
    import peft
    setup = {k: v for k, v in vars(args).items() if k not in ("child", "config")}
    setup.update(torch=torch.__version__, peft=peft.__version__, total_wall_s=total)
    notes = (f"SmolLM2-135M, batch {args.batch}x{args.seq} random token ids, {args.threads} torch threads, "
             f"{args.rounds} interleaved rounds after {args.warmup} warm-up calls (ratios: medians of per-round "
             f"ratios), torch {torch.__version__}, PEFT {peft.__version__}; {'--quick; ' if args.quick else ''}"
             f"total wall time {total / 60:.1f} min.")
    md = rows.table()
    print("\n" + md + "\n\n" + notes)
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    stem = "perf.quick" if args.quick else "perf"
    (dest / f"{stem}.md").write_text(f"# Performance against the physical limit (bench/perf.py, issue 13)\n\n{md}\n\n"
                                     f"{notes}\n")
    (dest / f"{stem}.json").write_text(json.dumps({"setup": setup, "rows": list(rows), "results": results},
                                                  indent=2, default=str) + "\n")
    print(f"\nwrote {dest / (stem + '.md')} and {dest / (stem + '.json')}")


if __name__ == "__main__":
    main()
