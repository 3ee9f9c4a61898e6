"""Speed, MFU and memory of this project side by side with PyTorch, in one process (issue 8).

    python bench.py                       # default CPU config (vocab 50257, 6x8, n_embd 512, block 256, batch 8)
    python bench.py --quick --json runs/bench_quick.json
    python bench.py --dtypes float32 --no-gen --reps 3

Prints a markdown table and, with --json, writes every number (top-level `ratios`). What is
measured and how: reflex_jax/bench_lib.py and notes/bench.md.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # before JAX starts: see reflex_jax/malloc_tuning.py
    from reflex_jax.malloc_tuning import tune_malloc
    tune_malloc()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small config, about 2 minutes")
    size.add_argument("--smoke", action="store_true", help="tiny config, seconds (tests)")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--dtypes", help="compute dtypes, comma-separated, first is the headline "
                   "(default bfloat16,float32)")
    p.add_argument("--reps", type=int, help="timed train steps per contender")
    p.add_argument("--gen-reps", type=int, help="timed generation calls per contender")
    p.add_argument("--batch", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--prompts", help="generation prompt lengths, comma-separated")
    p.add_argument("--new-tokens", type=int, help="generated tokens per cached/HF call")
    p.add_argument("--no-torch", action="store_true", help="skip every PyTorch contender")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-train", action="store_true", help="skip the training benchmark")
    p.add_argument("--no-gen", action="store_true", help="skip the generation benchmark")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers generate")
    p.add_argument("--attention", choices=("xla", "cudnn"),
                   help="attention backend of this project's models (cudnn: NVIDIA GPUs)")
    p.add_argument("--xla-flags", help="extra XLA_FLAGS for this run (set before jax starts)")
    p.add_argument("--ablation", action="store_true", help="only the train step, optimisations "
                   "switched on one by one (interleaved), instead of the benchmark")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from reflex_jax import bench_lib

    s = bench_lib.BenchSettings.preset("quick" if args.quick else "smoke" if args.smoke else "default")
    for field, value in (("train_reps", args.reps), ("gen_reps", args.gen_reps), ("batch", args.batch),
                         ("block_size", args.block_size), ("n_layer", args.n_layer),
                         ("n_embd", args.n_embd), ("n_head", args.n_head),
                         ("gen_new_tokens", args.new_tokens), ("attention", args.attention)):
        if value is not None:
            setattr(s, field, value)
    if args.dtypes:
        s.dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if args.prompts:
        s.gen_prompts = tuple(int(x) for x in args.prompts.split(","))
    s.torch, s.torch_compile = not args.no_torch, not (args.no_torch or args.no_compile) and s.torch_compile
    s.train, s.gen, s.hf = not args.no_train, not args.no_gen, not args.no_hf
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.ablation:
        res = bench_lib.ablation(s, log=log)
        print(bench_lib.ablation_markdown(res))
    else:
        res = bench_lib.run(s, log=log)
        print(bench_lib.markdown(res))
    if args.json:
        bench_lib.write_json(res, args.json)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
