"""The KV-sharing study (docs/study.md): every head plan x 3 seeds on four tasks, one compare.py grid
per task, `--workers` runs at a time (each pinned to its own core), and after every finished run the
task's report is rebuilt and, with --commit, committed, so a stopped study loses at most the runs in
flight (and those resume from their last checkpoint). The same command resumes it. Run it as a
module from the checkout's root, so that this checkout's reflex_jax is the one imported:

    python -m scripts.kv_family_study --plan                  # every run and its state
    python -m scripts.kv_family_study --commit                # all tasks, seed-major order
    python -m scripts.kv_family_study --tasks lit --seeds 0   # a part of it
"""
from __future__ import annotations

import argparse
import math
import os
import queue
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = ["none", "all", "recent:2,1", "kv:8,7,6,5,4,3", "fewer:all", "cla:2", "route",
             "all+value_residual"]
SEEDS = [0, 1, 2]
CONTROLS = "kv:8,7,6,5,4,3;fewer:all"  # matched KV bytes to `all`: GQA-style K/V heads; fewer query heads
# per task: (title, --config overrides); the rest is configs/study.py. Blocks fit the rows (kv_recall)
# and batches keep every run at >= 3 M tokens in 2,000 steps
TASKS = {
    "lit": ("Russian literature, Turgenev held out (bytes)",
            ["--config.data.dir={data}/lit_bytes_turgenev", "--config.data.loss_on=all"]),
    "kv4": ("Key-value recall, 4 pairs",
            ["--config.data.task=kv_recall", "--config.data.task_options.n_pairs=4",
             "--config.model.block_size=144", "--config.batch_size=11", "--config.data.loss_on=answer",
             "--config.eval_exact_match=128", "--config.eval_batches=8"]),
    "kv8": ("Key-value recall, 8 pairs",
            ["--config.data.task=kv_recall", "--config.data.task_options.n_pairs=8",
             "--config.model.block_size=208", "--config.batch_size=8", "--config.data.loss_on=answer",
             "--config.eval_exact_match=128", "--config.eval_batches=8"]),
    "qa": ("Russian Q/A rows (bytes), answer loss held out",
           ["--config.data.dir={data}/qa_bytes", "--config.data.loss_on=all"]),
}


def prepare_data(shared: str, data: str) -> None:
    """The two prepared directories (reused when up to date): literature without Turgenev as train
    and Turgenev as val, and the Q/A rows with 5% of them held out."""
    from reflex_jax.data import prepare
    authors = ["chekhov", "dostoevsky", "gogol", "lermontov", "pushkin", "tolstoy"]
    prepare([os.path.join(shared, "ru_text", a) for a in authors], "bytes",
            os.path.join(data, "lit_bytes_turgenev"), val_source=os.path.join(shared, "ru_text", "turgenev"),
            progress=False)
    prepare(os.path.join(shared, "ru_instructions", "ru_qa_combined.jsonl"), "bytes",
            os.path.join(data, "qa_bytes"), val_fraction=0.05, progress=False)


def unigram_level(data_dir: str, answer_only: bool, batch_size: int, block: int, n_batches: int) -> float:
    """Cross-entropy (nats per target) of the train split's token frequencies (add-one) on the
    targets the eval pass scores (the same fixed val batches; answer targets only if
    `answer_only`): the level of a model that ignores context, which a trained one must be below."""
    import numpy as np

    from reflex_jax.data import TokenData
    from reflex_jax.data.loader import val_batches
    d = TokenData.open(data_dir)
    counts = np.bincount(np.asarray(d.split("train")), minlength=d.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    nll = n = 0.0
    for b in val_batches(d, batch_size, block, n_batches):
        weight = b["valid"][:, 1:] * (b["mask"][:, 1:] if answer_only else 1.0)
        nll += float(-(logp[b["tokens"][:, 1:]] * weight).sum())
        n += float(weight.sum())
    return nll / n


def compare_args(task: str, args) -> list[str]:
    title, overrides = TASKS[task]
    # the recorded study ran before packed windows kept their documents apart
    return (["--config", "configs/study.py", "--title", title,
             "--runs_dir", os.path.join(args.runs_root, task), "--config.data.document_mask=False"]
            + [o.format(data=args.data_root) for o in overrides])


def compare(task: str, args, schedules, seeds, out: str, *extra: str, core=None) -> int:
    cmd = [sys.executable, "compare.py", *compare_args(task, args),
           "--schedules", ";".join(schedules), "--seeds", ",".join(map(str, seeds)), "--out", out, *extra]
    if core is not None:
        cmd = ["taskset", "-c", str(core)] + cmd
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # compare.py imports the reflex_jax beside it
    return subprocess.call(cmd, env=env, cwd=ROOT, stdout=args.log, stderr=subprocess.STDOUT)


def report(task: str, args, lock: threading.Lock, note: str) -> None:
    """Rebuild the task's full report from the runs on disk; commit it with --commit."""
    out = os.path.join(args.results_root, task)
    with lock:
        compare(task, args, SCHEDULES, SEEDS, out, "--report_only", "--controls", CONTROLS)
        if args.commit:
            out = os.path.join(ROOT, out)  # unchanged when absolute
            repo = subprocess.run(["git", "-C", out, "rev-parse", "--show-toplevel"],
                                  capture_output=True, text=True).stdout.strip()
            for _ in range(20):  # another git command may hold the index for a moment
                add = subprocess.call(["git", "-C", repo, "add", "--", out], stdout=subprocess.DEVNULL)
                done = add == 0 and subprocess.call(
                    ["git", "-C", repo, "commit", "-q", "-m", f"study {task}: {note}", "--", out],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) in (0, 1)
                if done:
                    break
                time.sleep(3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one core each")
    p.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "data"),
                   help="where ru_text/ and ru_instructions/ are")
    # relative paths are relative to the repository root (where compare.py runs)
    p.add_argument("--data_root", default="data")
    p.add_argument("--runs_root", default="runs/kv_family")
    p.add_argument("--results_root", default="experiments/kv_family")
    p.add_argument("--commit", action="store_true", help="git-commit each task's report after each run")
    p.add_argument("--plan", action="store_true", help="print every run and its state, then exit")
    p.add_argument("--report", action="store_true",
                   help="rebuild every task's report from the runs on disk, then exit")
    p.add_argument("--unigram", action="store_true",
                   help="print the unigram level of the prepared tasks' val splits, then exit")
    args = p.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}.")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.log = sys.stdout
    if args.plan:
        for t in tasks:
            compare(t, args, SCHEDULES, seeds, "/tmp/kv_family_plan", "--plan",
                    "--recorded_from", os.path.join(args.results_root, t))
        return 0
    lock = threading.Lock()
    if args.report:
        for t in tasks:
            report(t, args, lock, "report rebuilt")
        return 0
    data_root = os.path.join(ROOT, args.data_root)  # unchanged when absolute
    prepare_data(args.shared, data_root)
    if args.unigram:
        from reflex_jax.run_config import load_config
        c = load_config(os.path.join(ROOT, "configs", "study.py"), [])  # lit and qa keep its batches
        for name, answer_only in (("lit_bytes_turgenev", False), ("qa_bytes", False), ("qa_bytes", True)):
            level = unigram_level(os.path.join(data_root, name), answer_only, c.batch_size,
                                  c.model.block_size, c.eval_batches)
            print(f"{name}{' (answer tokens)' if answer_only else ''}: unigram level {level:.4f} nats/token "
                  f"= {level / math.log(2):.4f} bits/token")
        return 0
    from reflex_lab.compare.grid import run_name
    from reflex_lab.compare.runs import read_recorded
    jobs: queue.Queue = queue.Queue()
    for t in tasks:
        for seed in seeds:
            for s in SCHEDULES:
                jobs.put((t, s, seed))

    def worker(core: int) -> None:
        while True:
            try:
                t, s, seed = jobs.get_nowait()
            except queue.Empty:
                return
            t0 = time.time()
            report_dir = os.path.join(ROOT, args.results_root, t)  # unchanged when absolute
            recorded = run_name(s, seed) in read_recorded(report_dir)
            scratch = os.path.join(args.runs_root, "_single", f"w{core}")
            # a run the task's report records as finished is not trained again (its directory
            # may be gone: run directories are not kept in git)
            rc = compare(t, args, [s], [seed], scratch, "--recorded_from", report_dir, core=core)
            print(f"[{time.strftime('%H:%M:%S')}] {t} {s} s{seed}: exit {rc} in {time.time() - t0:.0f} s",
                  flush=True)
            if not (recorded and rc == 0):  # a recorded run changes nothing in the report
                report(t, args, lock, f"{s} seed {seed} ({'finished' if rc == 0 else f'exit {rc}'})")

    threads = [threading.Thread(target=worker, args=(i % os.cpu_count(),)) for i in range(args.workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
