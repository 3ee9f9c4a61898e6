"""scripts/gpu_study.py, the study for the first GPU, on the CPU: its --smoke run trains every arm
and seed on one token budget and writes one JSON per run and the paired contrasts; a missing data
directory is one sentence."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_study.py")


def _run(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_missing_data_is_one_sentence(tmp_path):
    proc = _run("--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "is not a prepared data directory" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_smoke_run_writes_each_run_and_the_contrasts(tmp_path):
    from reflex_jax.data import prepare
    for split, n in (("train", 4), ("val", 1)):
        os.makedirs(tmp_path / "text" / split)
        for i in range(n):
            (tmp_path / "text" / split / f"d{i}.txt").write_text(
                "".join(f"строка {j} документа {i}.\n" for j in range(200)), encoding="utf-8")
    prepare(str(tmp_path / "text" / "train"), "bytes", str(tmp_path / "data"),
            val_source=str(tmp_path / "text" / "val"), progress=False, verbose=False)
    out = tmp_path / "out"
    proc = _run("--smoke", "--data", str(tmp_path / "data"), "--test", str(tmp_path / "text" / "val"),
                "--out", str(out), "--budget_s", "30")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    head = json.loads((out / "parity.json").read_text())
    assert head["parity"]["pass"] and head["parity"]["max_abs_diff"] == 0.0  # the CPU against itself
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted(
        (a, s) for a in ("none", "all", "kv:8,7,6,5,4,3") for s in (0, 1))
    assert len({r["tokens"] for r in runs}) == 1 and all(r["steps"] == head["steps"] for r in runs)
    assert summary["metric"] == "test_bpb" and all(0 < r["test_bpb"] < 9 for r in runs)
    by = {(r["arm"], r["seed"]): r["test_bpb"] for r in runs}
    c = summary["contrasts"]["all - none"]
    assert c["per_seed"] == pytest.approx([by[("all", s)] - by[("none", s)] for s in (0, 1)])
    for r in runs:
        slug = r["arm"].replace(":", "-").replace(",", "-")
        assert json.loads((out / f"{slug}-s{r['seed']}.json").read_text())["test_bpb"] == r["test_bpb"]
