"""The lorakit command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorakit import options
from lorakit.algebra import METHODS
from lorakit.core.config import scale
from lorakit.core.errors import LoraError
from lorakit.core.guard import GUARDS
from lorakit.formats.io import FORMATS, atomic_write, convert, read, read_fetched, write


def inspect(path: str, allow_pickle: bool = False) -> str:
    """A report of an adapter file or folder (local or by hub id): format, base model, modules, ranks, alphas, size."""
    from lorakit.formats import hub

    p = hub.fetch(path)
    a, fmt = read_fetched(path, p, allow_pickle)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    ranks = sorted({m.r for m in a.modules.values()})
    alphas = sorted({m.alpha for m in a.modules.values()})
    lines = [
        f"file:        {path}" + (f" ({p})" if str(p) != path else ""),
        f"format:      {fmt}",
        f"base model:  {a.base_model or '(not recorded)'}",
        f"modules:     {len(a.modules)} LoRA" + (f" + {len(a.saved)} saved in full" if a.saved else ""),
        f"ranks:       {ranks}    alphas: {alphas}    rsLoRA: {a.use_rslora}    DoRA: "
        + (", ".join(sorted({f"magnitude per {m.dora_axis}put channel" for m in a.modules.values()
                             if m.magnitude is not None})) or "no"),
        f"parameters:  {a.num_params():,}",
        f"size:        {size:,} bytes ({size / 2**20:.2f} MiB)",
        "",
        f"{'module':<60} {'kind':<10} {'r':>4} {'alpha':>8} {'scale':>8}",
    ]
    for name, m in a.modules.items():
        lines.append(f"{name:<60} {m.kind or '?':<10} {m.r:>4} {m.alpha:>8g} {scale(m.r, m.alpha, a.use_rslora):>8.4g}")
    for name, sd in a.saved.items():
        lines.append(f"{name:<60} {'saved':<10} {sum(t.numel() for t in sd.values()):>,} params")
    if a.biases:
        lines.append(f"biases:      {len(a.biases)} trained biases")
    if a.embeddings:
        lines.append(f"tokens:      {', '.join(sorted(a.embeddings))} (learned embeddings)")
    header = {}
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            header = f.metadata() or {}
    if header:
        lines += ["", "header metadata:"]
        lines += [f"  {k}: {v if len(v) <= 100 else v[:97] + '...'}" for k, v in sorted(header.items())]
    return "\n".join(lines)


def positive(text: str) -> int:
    """An argparse type: an integer above 0 (steps, counts, sizes)."""
    n = int(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def pick_device(spec: str = "auto"):
    """The torch device for --device: auto is cuda when available, else mps, else cpu; one that is not there (a
    misspelt name, cuda on a machine without it) is a LoraError rather than a crash mid-load."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise LoraError(f"--device {spec!r} is not a device; give auto, cpu, cuda, cuda:N or mps") from None
    there = {"cpu": True, "cuda": torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count(),
             "mps": torch.backends.mps.is_available()}
    if not there.get(dev.type, False):
        raise LoraError(f"--device {spec!r}: this machine has no such device; give auto or cpu")
    return dev


def run_generate(args):
    from lorakit.llm.generate import complete, load_model

    model, tokenizer = load_model(args.model, args.adapter, args.merge, args.guard, pick_device(args.device))
    kw = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, chat=args.chat)
    if args.prompt:
        for prompt, text in zip(args.prompt, complete(model, tokenizer, args.prompt, **kw)):
            print(f">>> {prompt}\n{text}\n")
        return
    if not args.chat:
        raise LoraError("give --prompt TEXT, or --chat to type prompts")
    for line in sys.stdin:
        if line.strip():
            print(complete(model, tokenizer, [line.strip()], **kw)[0], flush=True)


def run_serve(args):
    import re

    from lorakit.formats import hub
    from lorakit.formats.io import base_model
    from lorakit.llm.server import serve

    paths = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name) or not path:
            raise LoraError(f"--adapter {spec!r}: write NAME=PATH, NAME a word of letters, digits, '_' or '-'")
        paths[name] = path
    if args.adapter_dir:
        folder = Path(args.adapter_dir)
        if not folder.is_dir():
            raise LoraError(f"--adapter-dir {folder}: no such folder")
        for f in sorted(folder.iterdir()):
            if f.suffix == ".safetensors" or (f / "adapter_config.json").is_file():
                paths.setdefault(re.sub(r"[^A-Za-z0-9_\-]", "_", f.stem), str(f))
    for name, path in paths.items():
        if hub.parse(path) is None and not Path(path).exists():
            raise LoraError(f"--adapter {name}={path}: no such file or folder")
        hub.fetch(path)  # a hub adapter is fetched (or found missing) before the model loads
    serve(base_model(args.model, list(paths.values())), paths, args.host, args.port, args.max_batch, args.max_queue,
          args.allow_runtime_loading, pick_device(args.device), args.allow_pickle)


def run_generate_image(args):
    from lorakit.formats.hub import name_of
    from lorakit.formats.io import parse_adapter
    from lorakit.sd.generate import generate, load_pipeline, sweep
    from lorakit.sd.images import grid

    triggers = {}
    for spec in args.trigger:
        name, sep, words = spec.partition("=")
        if not sep or not name or not words.strip(","):
            raise LoraError(f"--trigger {spec!r}: write NAME=WORD[,WORD], NAME being the LoRA's file name")
        triggers[name] = [w.strip() for w in words.split(",") if w.strip()]
    loras, swept = list(args.lora), None
    if args.sweep:
        swept, weights = parse_sweep(args.sweep)
        if args.fuse:
            raise LoraError("--sweep changes the LoRA's weight between images, which --fuse bakes in; leave out --fuse")
        given = [p for p, _ in map(parse_adapter, loras)]
        swept = next((p for p in given if swept in (p, name_of(p))), swept)
        if swept not in given:
            loras.append(swept)
    loaded = {}
    pipe, prompt = load_pipeline(args.model, loras, args.prompt, args.lora_dir, args.fuse, pick_device(args.device),
                                 guard=args.guard, triggers=triggers, loaded=loaded)
    kw = dict(negative_prompt=args.negative_prompt, count=args.count, steps=args.steps, guidance=args.guidance,
              seed=args.seed, size=args.size)
    cols, captions = None, None
    if swept:
        if swept not in loaded:
            raise LoraError(f"--sweep {args.sweep}: {swept} adds no LoRA layer to this pipeline (or a --trigger left "
                            "it out), so there is nothing to sweep")
        images, labels = sweep(pipe, loaded[swept], weights, prompt, **kw)
        cols, captions = len(weights), [f"{name_of(swept)} × {w:g}" for w in labels]
    else:
        images = generate(pipe, prompt, **kw)
    if args.captions and captions is None:
        captions = [prompt] * len(images)
    out = Path(args.out)
    if out.is_dir():
        raise LoraError(f"--out {out} is a folder; give the .png file to write")
    img = grid(images, cols, captions, min_cell=0 if args.native_size else 128)
    atomic_write(out, lambda tmp: img.save(tmp, format="PNG"))
    what = f"{len(weights)} weights of {name_of(swept)} x {args.count}" if swept else str(len(images))
    print(f"wrote {out} ({what} images for {prompt!r}, {img.size[0]}x{img.size[1]} px)")


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    """--sweep NAME:W1,W2,... -> (NAME, weights); NAME a --lora's file, hub id or name."""
    name, sep, text = spec.rpartition(":")
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        weights = []
    if not sep or not name or not weights:
        raise LoraError(f"--sweep {spec!r}: write NAME:W1,W2,... (e.g. style:0,0.5,1), NAME a --lora's file or name")
    return name, weights


def run_combine(args):
    from lorakit.algebra import combine
    from lorakit.formats.io import parse_adapter

    specs = [parse_adapter(f) for f in args.files]
    inputs = [(read(path, allow_pickle=args.allow_pickle)[0], w, path) for path, w in specs]
    a = combine(inputs, args.method, rank=args.rank, density=args.density, majority=args.majority, seed=args.seed,
                clamp=args.clamp_quantile, dynamic=args.dynamic, guard_method=args.guard)
    if args.method == "linear":
        print("note: --method linear is PEFT's, an approximation (cross terms between inputs); cat is exact")
    out = write(a, args.out, args.format)
    ranks = sorted({m.r for m in a.modules.values()})
    print(f"wrote {out} ({args.format}): {len(a.modules)} modules, rank {ranks[0]}"
          f"{f'..{ranks[-1]}' if len(ranks) > 1 else ''}, {args.method} of {len(inputs)} adapters")


def run_resize(args):
    from lorakit.algebra import resize

    a, report = resize(read(args.file, allow_pickle=args.allow_pickle)[0], args.rank, args.dynamic, args.clamp_quantile)
    print("\n".join(report.lines()))
    print(f"wrote {write(a, args.out, args.format)} ({args.format})")


def run_extract(args):
    from lorakit.algebra import extract
    from lorakit.merged import load_base

    base, tuned = load_base(args.base, tokenizer=False)[0], load_base(args.tuned, tokenizer=False)[0]
    targets = args.targets if args.targets in (None, "all-linear") else [t for t in args.targets.split(",") if t]
    a, report = extract(base, tuned, args.rank, args.dynamic, targets, args.clamp_quantile, args.min_diff,
                        base_model=args.base)
    print("\n".join(report.lines()))
    print(f"wrote {write(a, args.out, args.format)} ({args.format})")


def add_adapter_flags(p: argparse.ArgumentParser, guard: bool = True):
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (weights only)")
    if guard:
        p.add_argument("--guard", choices=GUARDS, help="hold back burn-out where stacked adapters meet (see README)")


def add_svd_flags(p: argparse.ArgumentParser, rank_help: str):
    p.add_argument("--rank", type=int, help=rank_help)
    p.add_argument("--dynamic", metavar="RULE", help="per-module rank: energy=E (kept share of Σσ²), fro=F, ratio=R "
                   "(keep σ ≥ σ₁/R) or cumulative=C; --rank caps it")
    p.add_argument("--clamp-quantile", type=float, metavar="Q", help="clip factor entries to their Q-quantile (kohya)")
    p.add_argument("--format", default="lorakit", choices=FORMATS, help="output format")
    p.add_argument("--out", required=True, help="output file (.safetensors) or folder (peft)")


def run_analyze(args):
    from lorakit.analysis import analyze, summary
    from lorakit.analysis import write as write_analysis
    from lorakit.merged import load_base

    a = read(args.file, allow_pickle=args.allow_pickle)[0]
    vs = read(args.vs, allow_pickle=args.allow_pickle)[0] if args.vs else None
    result = analyze(a, vs=vs, base=load_base(args.base, tokenizer=False)[0] if args.base else None)
    print("\n".join(summary(result)))
    print("wrote " + ", ".join(map(str, write_analysis(result, args.out))))


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as the one line `lorakit: error: ...` (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"lorakit: error: {self.prog.removeprefix('lorakit').strip() + ': ' if ' ' in self.prog else ''}"
                     f"{message}\n")


def main(argv: list[str] | None = None) -> int:
    from lorakit.core.errors import silence_known_notices

    silence_known_notices()  # before transformers and diffusers are imported
    from lorakit.llm.train import TrainConfig
    from lorakit.sd.train import SDTrainConfig

    parser = Parser(prog="lorakit", description="LoRA adapters: train, generate, inspect, convert, "
                                     "combine, resize, extract, merge-into, analyze, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe an adapter file or PEFT folder")
    p.add_argument("file")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (weights only)")
    c = sub.add_parser("convert", help="rewrite an adapter in another format (lorakit, peft, diffusers, kohya)")
    c.add_argument("src", help="adapter file or PEFT folder, any format lorakit reads")
    c.add_argument("dest", help="output file (.safetensors) or folder (peft; diffusers/kohya write a file in it)")
    c.add_argument("--to", required=True, choices=FORMATS)
    c.add_argument("--base", help="record this base model id (hub id or folder) in the output")
    c.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (weights only)")
    options.add_flags(sub.add_parser("train", help="train a LoRA (or a full fine-tune) on a language model"),
                      TrainConfig)
    options.add_flags(sub.add_parser("train-sd", help="train a LoRA on a Stable Diffusion pipeline (text2image, "
                                    "dreambooth, pivotal)"), SDTrainConfig)
    gi = sub.add_parser("generate-image", help="images from a Stable Diffusion pipeline with weighted LoRAs")
    gi.add_argument("--model", help="pipeline folder or hub id (default: the base recorded in the first LoRA)")
    gi.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="repeat to stack; "
                    "weights may be negative")
    gi.add_argument("--lora-dir", help="where prompt tags <lora:NAME:W> find NAME.safetensors")
    gi.add_argument("--prompt", required=True)
    gi.add_argument("--negative-prompt")
    gi.add_argument("--steps", type=positive, default=25, help="DPM-Solver++ steps")
    gi.add_argument("--guidance", type=float, default=7.5)
    gi.add_argument("--seed", type=int, default=0)
    gi.add_argument("--size", type=positive, help="image side in pixels (default: the model's)")
    gi.add_argument("--count", type=positive, default=4, help="images, laid out as one grid")
    gi.add_argument("--fuse", action="store_true", help="merge the LoRAs into the weights first (faster)")
    gi.add_argument("--guard", choices=GUARDS, help="hold back burn-out where stacked LoRAs meet (tags included)")
    gi.add_argument("--trigger", action="append", default=[], metavar="NAME=WORD[,WORD]", help="use LoRA NAME (its "
                    "file name without .safetensors) only when one of its words is in the prompt (prompt routing)")
    gi.add_argument("--sweep", metavar="NAME:W1,W2,...", help="the same prompt and seed at each weight of one LoRA "
                    "(a --lora's file or name, or another file), side by side with captions")
    gi.add_argument("--captions", action="store_true", help="write the prompt under each image")
    gi.add_argument("--native-size", action="store_true", help="keep the model's image size (small images are "
                    "otherwise scaled up, pixel for pixel, to at least 128 px)")
    gi.add_argument("--out", default="images.png")
    gi.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    g = sub.add_parser("generate", help="generate text with weighted adapters on a base model")
    g.add_argument("--model", help="base model (default: the one recorded in the first adapter)")
    g.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="an adapter and its weight (negative allowed); repeat to stack")
    g.add_argument("--prompt", action="append", help="text to continue; repeat for several")
    g.add_argument("--chat", action="store_true", help="use the chat template; without --prompt, read turns from stdin")
    g.add_argument("--merge", action="store_true", help="merge the adapters into the weights first (faster)")
    g.add_argument("--guard", choices=GUARDS, help="hold back burn-out where stacked adapters meet")
    g.add_argument("--max-new-tokens", type=positive, default=128)
    g.add_argument("--num-beams", type=positive, default=1)
    g.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    sv = sub.add_parser("serve", help="an OpenAI-compatible server: one base model, many adapters, each request "
                        "naming its adapter in `model` (continuous batching, one batch for all adapters)")
    sv.add_argument("--model", help="base model (default: the one recorded in the first adapter)")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter served as "
                    "model NAME (any format lorakit reads); repeat for several")
    sv.add_argument("--adapter-dir", metavar="DIR", help="also serve every .safetensors file and PEFT folder in DIR, "
                    "named by its file name")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000, help="0: a free port (the URL is printed)")
    sv.add_argument("--max-batch", type=positive, default=16, help="requests decoded together")
    sv.add_argument("--max-queue", type=positive, default=64, help="requests waiting beyond those; more get 429")
    sv.add_argument("--allow-runtime-loading", action="store_true", help="enable POST /v1/load_lora_adapter and "
                    "/v1/unload_lora_adapter (vLLM's endpoints)")
    sv.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt adapter files (weights only)")
    sv.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    cb = sub.add_parser("combine", help="one adapter from several weighted ones (cat exact; svd, ties, dare, linear)")
    cb.add_argument("files", nargs="+", metavar="F[:W]", help="adapters and their weights (negative allowed)")
    cb.add_argument("--method", default="cat", choices=METHODS)
    cb.add_argument("--density", type=float, help="ties/dare: the share of each ΔW kept")
    cb.add_argument("--majority", default="total", choices=["total", "frequency"], help="ties: how the sign is elected")
    cb.add_argument("--seed", type=int, default=0, help="dare: the random drop")
    add_svd_flags(cb, "svd/ties/dare: rank of the result (default: the largest input rank of each module)")
    add_adapter_flags(cb)
    rs = sub.add_parser("resize", help="truncate an adapter's rank by SVD, keeping its scale")
    rs.add_argument("file")
    add_svd_flags(rs, "the new rank (a module of rank ≤ K is kept exactly)")
    add_adapter_flags(rs, guard=False)
    ex = sub.add_parser("extract", help="a LoRA from the difference of two models (fine-tune minus base)")
    ex.add_argument("--base", required=True, help="the base model: transformers folder/hub id, pipeline or UNet folder")
    ex.add_argument("--tuned", required=True, help="the fine-tuned model, same architecture")
    ex.add_argument("--targets", help="comma-separated module names/suffixes, or all-linear (default: every Linear, "
                    "Conv, Conv1D and Embedding whose weight changed)")
    ex.add_argument("--min-diff", type=float, default=0.0, help="skip modules whose weights differ by at most this")
    add_svd_flags(ex, "rank of the LoRA")
    mi = sub.add_parser("merge-into", help="a plain model folder with adapters merged into its weights")
    mi.add_argument("--model", help="base model (default: the one recorded in the first adapter)")
    mi.add_argument("--adapter", action="append", required=True, metavar="F[:W]", help="repeat to stack")
    mi.add_argument("--out", required=True, help="a new folder (save_pretrained layout)")
    add_adapter_flags(mi)
    an = sub.add_parser("analyze", help="the LoRA paper's §7 analyses: spectra and effective rank of ΔW, subspace "
                        "similarity φ with another adapter, amplification of the base weight")
    an.add_argument("file", help="adapter file or PEFT folder, any format lorakit reads")
    an.add_argument("--vs", metavar="F2", help="a second adapter (e.g. another rank): φ(i, j) of the two A's")
    an.add_argument("--base", metavar="M", help="the base model (transformers folder/hub id/.gguf/embedded, a "
                    "pipeline folder or digits): ‖UᵀWVᵀ‖_F and the amplification factor")
    an.add_argument("--out", required=True, help="folder for analysis.json and the plots")
    an.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (weights only)")
    pu = sub.add_parser("push", help="upload a training run's adapter to the Hugging Face hub (exports in PEFT/"
                        "diffusers/kohya format, model card, loss curve, samples; never checkpoints or local paths)")
    pu.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a lorakit train or train-sd run")
    pu.add_argument("--repo", required=True, metavar="OWNER/NAME", help="the hub repo (created if missing)")
    pu.add_argument("--private", action="store_true", help="create the repo private")
    pu.add_argument("--format", action="append", metavar="FMT[,FMT]", help=f"formats to upload, from {FORMATS} "
                    "(repeat or comma-separate; default: lorakit,peft for an LLM run, lorakit,diffusers for SD)")
    pu.add_argument("--dry-run", nargs="?", const="", metavar="DIR", help="write the repo's files to DIR (default "
                    "RUN_DIR/hub-upload) and upload nothing")
    pu.add_argument("--revision", "--branch", metavar="BRANCH", help="push to this branch (created if missing)")
    pu.add_argument("--token", help="a hub token (default: the one `hf auth login` saved, or HF_TOKEN)")
    pu.add_argument("--base-model", metavar="OWNER/NAME", help="the base model's hub id, when the run used a "
                    "local copy of it")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (already reported in one line) or --help
        return e.code
    try:
        if args.command == "inspect":
            print(inspect(args.file, args.allow_pickle))
        elif args.command == "convert":
            out = convert(args.src, args.dest, args.to, base_model=args.base, allow_pickle=args.allow_pickle)
            print(f"wrote {out} ({args.to})")
        elif args.command == "train":
            from lorakit.llm.train import train

            result = train(options.from_args(args, TrainConfig))
            print("\n".join(f"{k}: {v}" for k, v in result.items()))
        elif args.command == "generate":
            run_generate(args)
        elif args.command == "train-sd":
            from lorakit.sd.train import train_sd

            result = train_sd(options.from_args(args, SDTrainConfig))
            print("\n".join(f"{k}: {v}" for k, v in result.items()))
        elif args.command == "generate-image":
            run_generate_image(args)
        elif args.command == "serve":
            run_serve(args)
        elif args.command == "analyze":
            run_analyze(args)
        elif args.command == "push":
            from lorakit.push import cli as run_push

            run_push(args)
        elif args.command == "combine":
            run_combine(args)
        elif args.command == "resize":
            run_resize(args)
        elif args.command == "extract":
            run_extract(args)
        elif args.command == "merge-into":
            from lorakit.formats.io import base_model, parse_adapter
            from lorakit.merged import merge_into

            specs = [parse_adapter(a) for a in args.adapter]
            out = merge_into(base_model(args.model, [p for p, _ in specs]), specs, args.out, args.guard, args.allow_pickle)
            print(f"wrote {out}")
    except LoraError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system's answer (permission denied, is a directory, disk full): one line too
        where = e.filename2 or e.filename  # a rename's target, else the file
        print(f"lorakit: error: {f'{where}: ' if where else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
