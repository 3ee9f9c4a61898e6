"""train.py --compile_cache: the second run of the same program reads its compiled steps back
from JAX's persistent cache and says so; a directory that cannot be written is one sentence."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _train(run_dir, cache_dir):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY,
           f"--compile_cache={cache_dir}", f"--config.run_dir={run_dir}",
           "--config.max_steps=2", "--config.batch_size=4", "--config.optim.warmup_steps=1",
           "--config.data.task_rows=64", "--config.data.task_val_rows=8",
           "--config.eval_interval=0", "--config.eval_exact_match=0",
           "--config.checkpoint_interval=0", "--config.async_checkpoints=false"]
    env = {**os.environ, "REFLEX_TUNE_MALLOC": "0", "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # cache even the fast compiles
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_a_second_run_reads_its_compiled_steps_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _train(tmp_path / "a", cache)
    line = [s for s in first.splitlines() if s.startswith("compile cache")]
    assert line and " 0 of " in line[0], first  # nothing to read yet; entries written
    assert any(name.endswith("-cache") for name in os.listdir(cache))
    second = _train(tmp_path / "b", cache)  # another run directory: the same programs
    (line,) = [s for s in second.splitlines() if s.startswith("compile cache")]
    hits, _, rest = line.split(": ", 1)[1].partition(" of ")
    assert int(hits) >= 1 and int(hits) == int(rest.split()[0]), line  # every program read back


def test_an_unwritable_cache_directory_is_one_sentence(tmp_path, capsys):
    from reflex_jax.cli import train
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        train.main(["--config", TINY, f"--compile_cache={blocker}/cache",
                    f"--config.run_dir={tmp_path}/run"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train.py: error: --compile_cache '{blocker}/cache' cannot be written")
    assert err.endswith("pass a directory this process can create and write.")
    assert len(err.splitlines()) == 1
