"""Speed, MFU and memory of this project side by side with PyTorch, in one process.

    python bench.py                       # the CPU default: vocab 50257, 6x8, n_embd 512,
                                          # block 256, batch 8
    python bench.py --quick --json runs/bench_quick.json
    python bench.py --dtypes float32 --no_gen --reps 3
    python bench.py --ablation            # the train step's kernels switched on one by one
    python bench.py --profile             # the step-time budget: where a train step's time goes

Prints a markdown table and, with --json, writes every number (top-level `ratios`). What is
measured and how: reflex_lab/bench/ and docs/bench.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from reflex_jax.cli import exit_on_user_error
from reflex_jax.errors import UsageError

DTYPES = ("bfloat16", "float32")  # the dtypes both JAX and the PyTorch peer run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small config, about 2 minutes")
    size.add_argument("--smoke", action="store_true", help="tiny config, seconds (tests)")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--dtypes", help="compute dtypes, comma-separated, first is the headline "
                   "(default bfloat16,float32)")
    p.add_argument("--reps", type=int, help="timed train steps per contender")
    p.add_argument("--gen_reps", type=int, help="timed generation calls per contender")
    p.add_argument("--batch", type=int)
    p.add_argument("--block_size", type=int)
    p.add_argument("--n_layer", type=int)
    p.add_argument("--n_embd", type=int)
    p.add_argument("--n_head", type=int)
    p.add_argument("--prompts", help="generation prompt lengths, comma-separated")
    p.add_argument("--new_tokens", type=int, help="generated tokens per cached/HF call")
    p.add_argument("--no_torch", action="store_true", help="skip every PyTorch contender")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no_train", action="store_true", help="skip the training benchmark")
    p.add_argument("--no_gen", action="store_true", help="skip the generation benchmark")
    p.add_argument("--no_hf", action="store_true", help="skip HF transformers generate")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn", "flash"),
                   help="attention backend of this project's models (docs/attention.md#backends)")
    p.add_argument("--xla_flags", help="extra XLA_FLAGS for this run (set before jax starts)")
    p.add_argument("--ablation", action="store_true", help="only the train step, optimisations "
                   "switched on one by one (interleaved), instead of the benchmark")
    p.add_argument("--profile", action="store_true", help="only the train step: its time split "
                   "into matmul sites, attention, norms, optimizer, copies... from the XLA and "
                   "PyTorch profilers, instead of the benchmark")
    return p


def _dtypes(text: str) -> tuple[str, ...]:
    dtypes = tuple(d.strip() for d in text.split(",") if d.strip())
    bad = [d for d in dtypes if d not in DTYPES]
    if not dtypes or bad:
        raise UsageError(f"--dtypes {text!r}: use a comma-separated list of {' and '.join(DTYPES)}.")
    return dtypes


def _prompts(text: str) -> tuple[int, ...]:
    try:
        prompts = tuple(int(x) for x in text.split(","))
    except ValueError:
        prompts = ()
    if not prompts or min(prompts) < 1:
        raise UsageError(f"--prompts {text!r}: use comma-separated positive prompt lengths, "
                         "e.g. 128,512.")
    return prompts


def settings_from(args: argparse.Namespace):
    """BenchSettings: the preset, then every flag that was given."""
    from .settings import BenchSettings
    s = BenchSettings.preset("quick" if args.quick else "smoke" if args.smoke else "default")
    for field, flag in (("train_reps", "reps"), ("gen_reps", "gen_reps"), ("batch", "batch"),
                        ("block_size", "block_size"), ("n_layer", "n_layer"),
                        ("n_embd", "n_embd"), ("n_head", "n_head"),
                        ("gen_new_tokens", "new_tokens")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise UsageError(f"--{flag} {value}: use a positive number.")
            setattr(s, field, value)
    if args.attention is not None:
        s.attention = args.attention
    if args.dtypes:
        s.dtypes = _dtypes(args.dtypes)
    if args.prompts:
        s.gen_prompts = _prompts(args.prompts)
    s.torch, s.torch_compile = not args.no_torch, not (args.no_torch or args.no_compile) and s.torch_compile
    s.train, s.gen, s.hf = not args.no_train, not args.no_gen, not args.no_hf
    return s


def _bench(args: argparse.Namespace) -> dict:
    if args.xla_flags:  # before the bench modules import (and start) JAX
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    from . import ablation, report, suite
    s = settings_from(args)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.ablation and args.profile:
        raise UsageError("--ablation and --profile are separate runs; pick one.")
    if args.profile:
        from . import profile
        res = profile.profile(s, log=log, with_torch=s.torch)
        print(profile.markdown(res))
    elif args.ablation:
        res = ablation.ablation(s, log=log)
        print(report.ablation_markdown(res))
    else:
        res = suite.run(s, log=log)
        print(report.markdown(res))
    if args.json:
        report.write_json(res, args.json)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return res


def main(argv: Optional[list[str]] = None, prog: str = "bench.py") -> Optional[dict]:
    """Run the benchmark `argv` asks for; returns its result (None after a user error, which is
    printed as one line before exiting with status 2)."""
    args = parser().parse_args(argv)
    with exit_on_user_error(prog):
        return _bench(args)
    return None


def run() -> None:
    """The `reflex-bench` console script (bench.py calls it too)."""
    from reflex_jax.malloc_tuning import tune_malloc
    tune_malloc()  # before JAX starts
    main(prog=os.path.basename(sys.argv[0]) or "bench.py")
