"""The pre-registered study (docs/study.md): stage A (each primary arm at three learning rates,
seed 0, chosen on the dev split), then stage B (each arm at its chosen rate, seeds 0-4, evaluated on
all of Turgenev), then stage D (the same arms and rates on associative recall rows, seeds 0-2,
recall evaluated). One run per core at a time; each finished run's JSON lands in
experiments/prereg/<stage>/ and, with --commit, is committed with the rebuilt report, so a stop
loses at most the runs in flight, which resume from their last checkpoint (every 150 steps) when
the same command runs again. Run it as a module from the checkout's root:

    python -m scripts.prereg_study --plan             # every run and its state
    python -m scripts.prereg_study --commit           # run what is left, two at a time
    python -m scripts.prereg_study --report           # rebuild experiments/prereg/report.md
    python -m scripts.prereg_study --cost             # measure each arm's cost (decoding speed)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from reflex_lab import prereg  # noqa: E402
from reflex_lab.prereg_report import load_results, write_report  # noqa: E402


def prepare_data(shared: str, data_root: str) -> tuple[str, str, str]:
    """(prepared data dir, dev text dir, test text dir); reused when up to date."""
    from reflex_jax.data import prepare
    text = os.path.join(data_root, "text")
    counts = prereg.split_authors(os.path.join(shared, "ru_text"), text)
    data = os.path.join(data_root, "lit")
    prepare(os.path.join(text, "train"), "bytes", data, val_source=os.path.join(text, "dev"),
            progress=False, verbose=False)
    print(f"data: {counts['train']:,} train bytes, {counts['dev']:,} dev bytes "
          f"({counts['dev_chunks']} of {counts['chunks']} chunks)", flush=True)
    return data, os.path.join(text, "dev"), os.path.join(shared, "ru_text", prereg.TEST_AUTHOR)


def result_path(args, run: prereg.Run) -> str:
    return os.path.join(ROOT, args.results, run.stage, run.name + ".json")


def pending(args) -> list[prereg.Run]:
    """Runs without a result: stage A first, then the stage B and then the stage D runs whose arm
    has a chosen lr."""
    results = load_results(os.path.join(ROOT, args.results))
    runs = (prereg.stage_a_runs() + prereg.stage_b_runs(results["chosen"])
            + prereg.stage_d_runs(results["chosen"]))
    return [r for r in runs if not os.path.exists(result_path(args, r))]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return (f"{fields.get('Model name', '?').strip()} family {fields.get('CPU family', '?').strip()} "
                f"model {fields.get('Model', '?').strip()}")
    except OSError:
        return platform.processor()


STOP = threading.Event()      # set by SIGTERM / SIGINT: no new runs; the runs in flight save and stop
CHILDREN: set = set()
CHILDREN_LOCK = threading.Lock()


def call(cmd: list[str], **kwargs) -> int:
    """subprocess.call that a stop of the driver passes on: the child gets SIGTERM (train.py saves
    a checkpoint and exits), so a stopped study resumes from where each run was."""
    if STOP.is_set():
        return -signal.SIGTERM
    proc = subprocess.Popen(cmd, **kwargs)
    with CHILDREN_LOCK:
        CHILDREN.add(proc)
    try:
        return proc.wait()
    finally:
        with CHILDREN_LOCK:
            CHILDREN.discard(proc)


def _stop(signum, _frame) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {signal.Signals(signum).name}: stopping the runs in flight "
          "(each saves a checkpoint); the same command resumes them", flush=True)
    STOP.set()
    with CHILDREN_LOCK:
        for proc in CHILDREN:
            proc.send_signal(signal.SIGTERM)


def run_one(args, run: prereg.Run, core: int, paths) -> int:
    data, dev, test = paths
    run_dir = os.path.join(ROOT, args.runs, run.stage, run.name)
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    pin = ["taskset", "-c", str(core)]
    with open(os.path.join(run_dir, "driver.log"), "a") as log:
        t0 = time.time()
        rc = call(pin + [sys.executable, "train.py", "--config", "configs/study.py",
                         *run.overrides(data, run_dir)],
                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        train_s = time.time() - t0
        if rc != 0:
            return rc
        evals = {}
        if run.stage == "D":  # every pair of a context asked, as the run trained
            jobs = [("recall", ["--evals", "recall", "--recall_format", "multi"])]
        else:
            jobs = [("dev", ["--evals", "bpb", "--text", dev])]
        if run.stage == "B":
            jobs.append(("test", ["--text", test]))
        t1 = time.time()
        for key, extra in jobs:
            out = os.path.join(run_dir, f"evals_{key}.json")
            rc = call(pin + [sys.executable, "-m", "reflex_jax.evals", "--run", run_dir,
                             "--which", "latest", "--json", out, *extra],
                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            if rc != 0:
                return rc
            with open(out) as f:
                evals[key] = json.load(f)
    from reflex_lab.compare.runs import read_metrics
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    val = [r for r in rows if r.get("val_loss") is not None]
    result = {"stage": run.stage, "arm": run.arm, "lr": run.lr, "seed": run.seed, "steps": run.steps,
              "tokens": int(rows[-1]["tokens"]) if rows and "tokens" in rows[-1] else None,
              "final_train_loss": rows[-1].get("loss") if rows else None,
              "dev_curve": [{"step": r["step"], "val_loss": r["val_loss"], "val_bpb": r.get("val_bpb")}
                            for r in val],
              "train_s": round(train_s, 1), "eval_s": round(time.time() - t1, 1),
              "cpu": cpu_model(), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip(),
              "evals": evals}
    path = result_path(args, run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return 0


def report_and_commit(args, lock: threading.Lock, note: str, extra: tuple[str, ...] = ()) -> None:
    with lock:
        results = os.path.join(ROOT, args.results)
        write_report(results)
        if not args.commit:
            return
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        for _ in range(20):  # another git command may hold the index for a moment
            if subprocess.call(["git", "-C", ROOT, "add", "--", results], **quiet) == 0 and subprocess.call(
                    ["git", "-C", ROOT, "commit", "-q", "-m", f"prereg study: {note}", "--", results],
                    **quiet) in (0, 1):
                return
            time.sleep(3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one core each")
    p.add_argument("--cores", default="", help="comma list of cores to pin the workers to (default 0,1,...)")
    p.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "data"),
                   help="where ru_text/ is")
    p.add_argument("--data_root", default=os.path.join(ROOT, "data", "prereg"))
    p.add_argument("--runs", default="runs/prereg")
    p.add_argument("--results", default="experiments/prereg")
    p.add_argument("--commit", action="store_true", help="git-commit each finished run with the report")
    p.add_argument("--plan", action="store_true", help="print every pending run, then exit")
    p.add_argument("--report", action="store_true", help="rebuild the report from the results, then exit")
    p.add_argument("--max_runs", type=int, default=0, help="stop after this many runs (0: all)")
    p.add_argument("--cost", action="store_true",
                   help="measure every arm's params, KV bytes, FLOPs and decoding speed (alone on "
                        "a quiet machine: the arms are timed side by side), rebuild the report, exit")
    p.add_argument("--cost_reps", type=int, default=8, help="interleaved decoding rounds for --cost")
    args = p.parse_args()
    lock = threading.Lock()
    if args.report:
        report_and_commit(args, lock, "report rebuilt")
        return 0
    if args.cost:
        from reflex_lab.prereg_cost import measure
        from reflex_lab.prereg_report import COST_FILE
        cost = measure(cpu_model(), reps=args.cost_reps, log=lambda s: print(s, flush=True))
        with open(os.path.join(ROOT, args.results, COST_FILE), "w") as f:
            json.dump(cost, f, indent=1)
        report_and_commit(args, lock, "cost measured")
        return 0
    if args.plan:
        todo = pending(args)
        for r in todo:
            state = "partial" if os.path.isdir(os.path.join(ROOT, args.runs, r.stage, r.name)) else "new"
            print(f"{r.stage} {r.name:36s} {r.steps} steps  {state}")
        print(f"{len(todo)} runs pending (stage B lists only arms whose lr is chosen)")
        return 0
    paths = prepare_data(args.shared, args.data_root)
    cores = [int(c) for c in args.cores.split(",") if c] or list(range(args.workers))
    taken: set = set()
    started = [0]
    running = [0]

    def worker(core: int) -> None:
        while True:
            with lock:
                if STOP.is_set() or (args.max_runs and started[0] >= args.max_runs):
                    return
                todo = [r for r in pending(args) if r.name + r.stage not in taken]
                if not todo and not running[0]:
                    return
                if todo:
                    run = todo[0]
                    taken.add(run.name + run.stage)
                    started[0] += 1
                    running[0] += 1
            if not todo:  # stage B's next runs wait for the lr the run in flight may choose
                time.sleep(30)
                continue
            t0 = time.time()
            try:
                rc = run_one(args, run, core, paths)
            finally:
                with lock:
                    running[0] -= 1
            print(f"[{time.strftime('%H:%M:%S')}] {run.stage} {run.name}: exit {rc} "
                  f"in {time.time() - t0:.0f} s", flush=True)
            if rc == 0:
                report_and_commit(args, lock, f"stage {run.stage} {run.name}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    threads = [threading.Thread(target=worker, args=(c,)) for c in cores[:args.workers]]
    for th in threads:
        th.start()
    for th in threads:
        while th.is_alive():  # a timed join lets the signal handlers run
            th.join(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
