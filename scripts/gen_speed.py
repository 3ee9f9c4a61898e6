"""Quick measurement: cached generation vs re-running the whole prefix for every token.

    python scripts/gen_speed.py                       # 6x8 'all', n_embd 256, vocab 50257, batch 1
    python scripts/gen_speed.py --lengths 64,128 --new_tokens 16 --repeats 5

Both sides are greedy, batch 1, float32, compiled, and timed alternately in one run (the machine is
shared and noisy); compile time is excluded on both sides. "no cache" is what the original PyTorch
code did: every new token runs the full forward pass over the whole current prefix (compiled once
per prefix length, logits for the last position only). "cached" is `Generator.generate`: one
prefill plus the compiled decode loop, end to end including the prefill; "decode only" subtracts
a 1-token call (prefill + first token) from it. This is a quick look, not the benchmark (bench.py
makes it rigorous; the prefix re-run is its `make_recompute`).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import numpy as np

from reflex_jax.model import ModelConfig, init_params
from reflex_jax.sampling import Generator
from reflex_lab.bench.generation import make_recompute
from reflex_lab.machine import cpu_model


def make_uncached(cfg: ModelConfig):
    """The prefix re-run of the benchmark for one prompt (a list of ids) -> the new ids."""
    recompute = make_recompute(cfg)
    return lambda params, prompt, n: recompute(params, np.asarray([prompt]), n)[0].tolist()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="64,128,256", help="prompt lengths, comma-separated")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--head_plan", "--reflex", default="all", help="model.head_plan (--reflex: its old name)")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    cfg = ModelConfig(vocab_size=args.vocab_size, block_size=max(lengths) + args.new_tokens,
                      n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      head_plan=args.head_plan, dtype="float32")
    params = init_params(cfg, jax.random.PRNGKey(0))
    gen, uncached = Generator(cfg), make_uncached(cfg)
    n = args.new_tokens

    print(f"# {datetime.date.today()} | {cpu_model()}, {os.cpu_count()} cores | jax {jax.__version__}"
          f" | load avg {os.getloadavg()[0]:.1f}")
    print(f"# model {cfg.schedule_table()}, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, float32, "
          f"batch 1, greedy, {n} new tokens, median of {args.repeats}")
    print("| prompt | cached tok/s | cached, decode only | no-cache tok/s | speed-up | same tokens |")
    print("|---:|---:|---:|---:|---:|:---:|")
    for length in lengths:
        prompt = np.random.default_rng(length).integers(0, cfg.vocab_size, length).tolist()
        def run_cached(prompt=prompt):
            return gen.generate(params, [prompt], max_new_tokens=n)[0]

        def run_first(prompt=prompt):  # the same buckets
            return gen.generate(params, [prompt], max_new_tokens=1)[0]

        def run_uncached(prompt=prompt):
            return uncached(params, prompt, n)
        same = run_cached() == run_uncached()  # also compiles both sides
        run_first()
        t_cached, t_first, t_uncached = [], [], []
        for _ in range(args.repeats):  # interleaved, so all see the same machine noise
            t_cached.append(timed(run_cached)[0])
            t_first.append(timed(run_first)[0])
            t_uncached.append(timed(run_uncached)[0])
        tc, tf, tu = (statistics.median(t) for t in (t_cached, t_first, t_uncached))
        decode = f"{(n - 1) / (tc - tf):.1f}" if tc > tf else "n/a (noise)"
        print(f"| {length} | {n / tc:.1f} | {decode} | {n / tu:.1f} | "
              f"{tu / tc:.1f}x | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
