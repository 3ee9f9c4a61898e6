"""Where a deviceless TPU compile spends its time, from libtpu's own log:
`python experiments/compile_time/passes.py TARGET [measure.py's options]`.

Runs measure.py (the train step alone) with libtpu's log on and its HLO pass pipelines at
verbosity 1, then prints one JSON line: measure.py's, plus the compiler's stage durations
(HLO_PASSES: the HLO optimisation passes; BACKEND_PASSES: lowering to the TPU's instructions,
scheduling and register allocation; CODE_GENERATION), the final program's bundle count (the
TPU's VLIW instruction bundles) and the HLO passes that took longest (leaf passes: a pipeline's
time is the sum of its passes, so pipelines are left out). Only the TPU compiler writes this log.
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


def summarise(log_text: str, top: int = 12) -> dict:
    """{"stages_s": {stage: seconds}, "bundles", "hlo_passes_s": the leaf passes' total,
    "top_passes": [[pass, seconds, runs], ...]} from a libtpu log."""
    seconds, runs, pipelines = collections.Counter(), collections.Counter(), set()
    stages, bundles = {}, None
    for line in log_text.splitlines():
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
    return {"stages_s": {k: round(v, 2) for k, v in stages.items()}, "bundles": bundles,
            "hlo_passes_s": round(sum(leaves.values()), 2),
            "top_passes": [[k, round(v, 2), runs[k]] for k, v in ranked]}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") or argv[0] == "cpu":
        print("passes.py: give a TPU target first (e.g. v5p:2x2x1), then measure.py's options; "
              "only the TPU compiler writes the log it reads.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as logs:
        env = dict(os.environ, TPU_STDERR_LOG_LEVEL="0", TPU_MIN_LOG_LEVEL="0",
                   TPU_VMODULE="hlo_pass_pipeline=1", TPU_LOG_DIR=logs)
        done = subprocess.run([sys.executable, os.path.join(HERE, "measure.py"), *argv], env=env,
                              capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        return done.returncode
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(summarise(done.stderr))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
