"""Where a deviceless TPU compile spends its time, from libtpu's own log:
`python experiments/compile_time/passes.py TARGET [measure.py's options]`.

Runs measure.py (the train step alone) with libtpu's log on and its HLO pass pipelines at
verbosity 1, then prints one JSON line: measure.py's, plus the compiler's stage durations
(HLO_PASSES: the HLO optimisation passes; BACKEND_PASSES: lowering to the TPU's instructions,
scheduling and register allocation; CODE_GENERATION), the final program's bundle count (the
TPU's VLIW instruction bundles) and the HLO passes that took longest (leaf passes: a pipeline's
time is the sum of its passes, so pipelines are left out), and the log's longest silences (what
ran before and after them: work that logs nothing, such as the backend's). `--log FILE` keeps
the whole log. Only the TPU compiler writes this log.
"""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
_PASS = re.compile(r"HLO pass: (\S+) time: ([\d.]+) (us|ms|s|min|h)\b")
_PIPELINE = re.compile(r"Running HLO pass pipeline on module \S+: (\S+)")
_STAGE = re.compile(r"\] (\w+) stage duration: ([\d.]+)s")
_BUNDLES = re.compile(r"final program bundle count: ([\d,]+)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
_STAMP = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s+\d+ ([\w.]+:\d+)\] (.*)")


def summarise(log_text: str, top: int = 12) -> dict:
    """{"stages_s": {stage: seconds}, "bundles", "hlo_passes_s": the leaf passes' total,
    "top_passes": [[pass, seconds, runs], ...], "span_s": first to last log line,
    "silences": [[seconds, source of the line before, its text, source of the line after], ...]}
    from a libtpu log."""
    seconds, runs, pipelines = collections.Counter(), collections.Counter(), set()
    stages, bundles, stamped = {}, None, []
    for line in log_text.splitlines():
        if m := _STAMP.match(line):
            t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
            stamped.append((t, m.group(4), m.group(5)[:100]))
        if m := _PIPELINE.search(line):
            pipelines.add(m.group(1))
        elif m := _PASS.search(line):
            seconds[m.group(1)] += float(m.group(2)) * _UNIT[m.group(3)]
            runs[m.group(1)] += 1
        elif m := _STAGE.search(line):
            stages[m.group(1)] = stages.get(m.group(1), 0.0) + float(m.group(2))
        elif m := _BUNDLES.search(line):
            bundles = (bundles or 0) + int(m.group(1).replace(",", ""))
    leaves = {k: v for k, v in seconds.items() if k not in pipelines}
    ranked = sorted(leaves.items(), key=lambda kv: -kv[1])[:top]
    gaps = sorted(((b[0] - a[0], a, b) for a, b in zip(stamped, stamped[1:])),
                  key=lambda g: -g[0])[:5]
    return {"stages_s": {k: round(v, 2) for k, v in stages.items()}, "bundles": bundles,
            "hlo_passes_s": round(sum(leaves.values()), 2),
            "top_passes": [[k, round(v, 2), runs[k]] for k, v in ranked],
            "span_s": round(stamped[-1][0] - stamped[0][0], 1) if stamped else None,
            "silences": [[round(g, 1), a[1], a[2], b[1]] for g, a, b in gaps]}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep = None
    for i, arg in enumerate(argv):  # --log FILE or --log=FILE; the rest goes to measure.py
        if arg == "--log" or arg.startswith("--log="):
            inline = arg.startswith("--log=")
            keep = arg[len("--log="):] if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i:i + (1 if inline else 2)]
            if not keep:
                print("passes.py: --log needs a file to write the log to.", file=sys.stderr)
                return 2
            break
    if not argv or argv[0].startswith("-") or argv[0] == "cpu":
        print("passes.py: give a TPU target first (e.g. v5p:2x2x1), then measure.py's options; "
              "only the TPU compiler writes the log it reads.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as logs:
        env = dict(os.environ, TPU_STDERR_LOG_LEVEL="0", TPU_MIN_LOG_LEVEL="0",
                   TPU_VMODULE="hlo_pass_pipeline=1", TPU_LOG_DIR=logs)
        done = subprocess.run([sys.executable, os.path.join(HERE, "measure.py"), *argv], env=env,
                              capture_output=True, text=True)
    if keep:
        with open(keep, "w") as f:
            f.write(done.stderr)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        return done.returncode
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(summarise(done.stderr))
    # what else steers the compile (e.g. JAX_DEFAULT_PRNG_IMPL), as set for this run
    row["env"] = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_", "LIBTPU_"))}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
