"""The study at a size the CPUs cannot reach, for the first GPU at hand, in one call of under 9
minutes: a parity check (a small model's logits on the device against the CPU), then `none`,
`all` and `kv:8,7,6,5,4,3` at n_embd 256, context 1024 (the byte-level study model of
configs/study.py, wider and longer), seeds 0 and 1, every run on the same number of tokens: what the
slowest arm trains in its share of the budget, sized from 30 timed steps per arm. Each finished run
writes <out>/<arm>-s<seed>.json at once (dev bits per byte from the data's val split, and bits per
byte on --test, the held-out author, when given); <out>/summary.json holds the paired contrasts.

    python -m scripts.prereg_study --plan        # prepares data/prereg (train and dev split), here
    mkdir -p data/prereg/test && cp ../shared/data/ru_text/turgenev/*.txt data/prereg/test/
    python scripts/gpu_study.py --data data/prereg/lit --test data/prereg/test --out gpu_study
    python scripts/gpu_study.py --smoke --data DIR --out /tmp/gpu_study     # the same paths, tiny, CPU
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the checkout beside this script, installed or not
    sys.path.insert(0, ROOT)

ARMS = ("none", "all", "kv:8,7,6,5,4,3")
SEEDS = (0, 1)
SIZES = {"full": {"n_embd": 256, "block_size": 1024, "batch_size": 32, "timed_steps": 30,
                  "parity_embd": 64, "eval_windows": 1024},
         "smoke": {"n_embd": 32, "block_size": 64, "batch_size": 2, "timed_steps": 4,
                   "parity_embd": 32, "eval_windows": 16}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gpu_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a prepared byte-level data directory (train and val)")
    p.add_argument("--test", default="", help="held-out .txt files or directories (bits per byte)")
    p.add_argument("--out", required=True, help="directory for one JSON per run and summary.json")
    p.add_argument("--budget_s", type=float, default=480.0,
                   help="wall seconds for everything (default 480; the device call allows 540)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds, on any backend")
    return p.parse_args(argv)


def sizes(args) -> dict:
    return SIZES["smoke" if args.smoke else "full"]


def slug(arm: str) -> str:
    return arm.replace(":", "-").replace(",", "-")


def study_config(args, arm: str, seed: int, steps: int, run_dir: str):
    from reflex_jax.run_config import load_config
    sz = sizes(args)
    c = load_config(os.path.join(ROOT, "configs", "study.py"), [])
    c.model.n_embd, c.model.block_size, c.model.head_plan = sz["n_embd"], sz["block_size"], arm
    c.batch_size, c.max_steps, c.seed = sz["batch_size"], steps, seed
    c.data.dir, c.run_dir, c.data.document_mask = args.data, run_dir, True
    c.optim.lr, c.optim.min_lr = args.lr, args.lr / 30
    c.optim.warmup_steps = max(1, min(100, steps // 10))
    c.eval_interval, c.eval_batches = steps, 16
    c.log_interval = max(1, min(10, steps // 4))
    c.checkpoint_interval, c.keep_checkpoints = steps, 1
    return c


def parity(args) -> dict:
    """float32 logits at "highest" matmul precision, device against the CPU backend, with the
    tolerance rule of tests/tolerance.py."""
    import jax
    import numpy as np

    from reflex_jax.kernels import KernelChoices
    from reflex_jax.model import Decoder, ModelConfig, init_params
    from scripts.gpu_check import _tolerance
    cpu, dev = jax.devices("cpu")[0], jax.devices()[0]
    e = sizes(args)["parity_embd"]
    cfg = ModelConfig(vocab_size=259, block_size=128, n_layer=6, n_head=8, n_embd=e, head_plan="all",
                      norm="rmsnorm", mlp="swiglu", bias=False, dtype="float32")
    tokens = np.random.default_rng(0).integers(0, 259, (2, 128)).astype(np.int32)
    with jax.default_device(cpu):
        params = init_params(cfg, jax.random.PRNGKey(0),
                             model=Decoder(cfg, kernels=KernelChoices(platform="cpu")))
    logits = {}
    for where, d in (("device", dev), ("cpu", cpu)):
        model = Decoder(cfg, kernels=KernelChoices(platform=d.platform))
        with jax.default_matmul_precision("highest"):
            f = jax.jit(lambda p, t, model=model: model.apply({"params": p}, t))
            logits[where] = np.asarray(f(jax.device_put(params, d), jax.device_put(tokens, d)), np.float64)
    diff = float(np.max(np.abs(logits["device"] - logits["cpu"])))
    tol = _tolerance(logits["cpu"], cfg.n_layer, "float32")
    return {"device": dev.device_kind, "max_abs_diff": diff, "tolerance": tol, "pass": diff <= tol}


def train_run(args, arm: str, seed: int, steps: int, run_dir: str, log) -> dict:
    """Train one run in this process (the persistent compilation cache serves a repeated arm);
    return its wall seconds, steady tokens/s and final numbers."""
    from reflex_jax.train.trainer import Trainer
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    trainer = Trainer(study_config(args, arm, seed, steps, run_dir), log=lambda s: None)
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar; errors still raise
        summary = trainer.train()
    trainer.release()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steady = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r and r.get("val_loss") is None]
    val = [r for r in rows if r.get("val_loss") is not None]
    out = {"arm": arm, "seed": seed, "steps": steps, "wall_s": round(wall, 1),
           "tokens": rows[-1].get("tokens") if rows else None,
           "tokens_per_s": statistics.median(steady) if steady else None,
           "dev_loss": val[-1]["val_loss"] if val else None,
           "dev_bpb": val[-1].get("val_bpb") if val else None,
           "stopped_by": summary.get("stopped_by")}
    log(f"{arm} s{seed}: {steps} steps in {wall:.1f} s, dev bpb {out['dev_bpb']}")
    return out


def test_bpb(args, run_dir: str) -> dict | None:
    if not args.test:
        return None
    from reflex_jax.evals import evaluate
    windows = sizes(args)["eval_windows"]
    r = evaluate(run_dir, ["bpb"], text=[args.test], which="latest", max_windows=windows, log=lambda s: None)
    return {"bpb": r["bpb"]["bpb"], "windows": r["bpb"]["windows"], "bytes": r["bpb"]["bytes"]}


def summary(runs: list[dict]) -> dict:
    """all - other, per seed and mean, on test bpb where measured, else dev bpb."""
    key = "test_bpb" if all(r.get("test_bpb") is not None for r in runs) else "dev_bpb"
    by = {(r["arm"], r["seed"]): r[key] for r in runs}
    out = {"metric": key, "contrasts": {}}
    for other in ("none", "kv:8,7,6,5,4,3"):
        d = [by[("all", s)] - by[(other, s)] for s in SEEDS if ("all", s) in by and (other, s) in by]
        out["contrasts"][f"all - {other}"] = {"per_seed": d, "mean": statistics.mean(d) if d else None}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if not os.path.isfile(os.path.join(args.data, "meta.json")):
        print(f"gpu_study.py: error: --data {args.data!r} is not a prepared data directory (no meta.json); "
              "prepare one with python -m scripts.prereg_study --plan or python -m reflex_jax.data prepare.",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    def log(s):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {s}", flush=True)

    def write(name, obj):
        with open(os.path.join(args.out, name + ".tmp"), "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))

    head = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "jax": jax.__version__, "sizes": sizes(args), "lr": args.lr}
    head["parity"] = parity(args)
    log(f"parity: {head['parity']}")
    write("parity.json", head)
    if not head["parity"]["pass"]:
        return 1
    # 30 timed steps per arm; what a run spends besides its steady steps (start, compile, eval,
    # checkpoint) is its wall time less those steps at the steady rate
    sz = sizes(args)
    tokens_per_step = sz["batch_size"] * sz["block_size"]
    scratch = os.path.join(args.out, "runs")
    timed = {}
    for arm in ARMS:
        run_dir = os.path.join(scratch, "timing-" + slug(arm))
        timed[arm] = train_run(args, arm, 0, sz["timed_steps"], run_dir, log)
        t0 = time.perf_counter()
        test_bpb(args, run_dir)
        timed[arm]["test_eval_s"] = round(time.perf_counter() - t0, 1)
    slowest = min(t["tokens_per_s"] or math.inf for t in timed.values())
    overhead = max(t["wall_s"] + t["test_eval_s"]
                   - t["steps"] * tokens_per_step / (t["tokens_per_s"] or slowest) for t in timed.values())
    left = args.budget_s - (time.perf_counter() - t_start)
    per_run = left / (len(ARMS) * len(SEEDS)) - overhead
    steps = max(sz["timed_steps"], int(max(per_run, 0) * slowest / tokens_per_step) // 10 * 10)
    head.update(timing=timed, steps=steps, tokens_per_run=steps * tokens_per_step,
                seconds_per_run_planned=round(per_run, 1))
    write("parity.json", head)
    log(f"budget: {steps} steps ({steps * tokens_per_step:,} tokens) per run")
    runs = []
    for seed in SEEDS:
        for arm in ARMS:
            run_dir = os.path.join(scratch, f"{slug(arm)}-s{seed}")
            r = train_run(args, arm, seed, steps, run_dir, log)
            r["test_bpb"] = (test_bpb(args, run_dir) or {}).get("bpb")
            r["device"], r["jax"] = head["device"], head["jax"]
            write(f"{slug(arm)}-s{seed}.json", r)
            runs.append(r)
            write("summary.json", {**head, "runs": runs, **summary(runs),
                                   "wall_s": round(time.perf_counter() - t_start, 1)})
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
