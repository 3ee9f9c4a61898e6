"""Run directories in a bucket: train.py into gs://bucket/run on a local GCS emulator (loopback
only), killed after a checkpoint and resumed; load_params, read_meta and sample.py read it back.

gcsfs carries the small run files and orbax/tensorstore the checkpoints, each pointed at the
emulator by its environment variable (see reflex_jax/storage.py)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from reflex_jax import checkpoint as ckpt
from reflex_jax import storage
from reflex_jax.errors import CheckpointError, MissingFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"
TINY = ["--config.model.n_layer=2", "--config.model.n_head=4", "--config.model.n_embd=32",
        "--config.model.block_size=32", "--config.data.task_rows=400",
        "--config.data.task_val_rows=16", "--config.batch_size=8", "--config.eval_interval=0",
        "--config.eval_exact_match=0", "--config.log_interval=1", "--config.optim.warmup_steps=2",
        "--config.data.loss_on=all", "--config.async_checkpoints=False"]


def _missing() -> str:
    for module, package in (("gcp_storage_emulator", "gcp-storage-emulator"), ("gcsfs", "gcsfs")):
        try:
            __import__(module)
        except ImportError:
            return package
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_env(url: str, tmp) -> dict:
    return {
        "STORAGE_EMULATOR_HOST": url,            # gcsfs: the run files
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # its bucket-type probe speaks gRPC
        "TENSORSTORE_GCS_HTTP_URL": url,         # tensorstore: the checkpoint arrays
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # no credential search, no metadata server
        "CLOUDSDK_CONFIG": str(tmp / "gcloud"),  # no real credentials
        "XDG_CACHE_HOME": str(tmp / "cache"),    # task data of a bucket run lives here
    }


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment, also applied to this process (restored afterwards)."""
    missing = _missing()
    if missing:
        reason = f"{missing} is not installed (pip install gcp-storage-emulator gcsfs)"
        print(f"test_gcs skipped: {reason}")
        pytest.skip(reason)
    from gcp_storage_emulator.server import create_server
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    env = _emulator_env(f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("gcs"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config  # read FSSPEC_* at import, which may have happened already
    gcs_conf = fsspec.config.conf.get("gcs")
    fsspec.config.conf["gcs"] = dict(gcs_conf or {}, token="anon")
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if gcs_conf is None:
            fsspec.config.conf.pop("gcs", None)
        else:
            fsspec.config.conf["gcs"] = gcs_conf


def test_storage_paths_on_the_emulator(gcs):
    run = f"gs://{BUCKET}/paths/run"
    assert storage.is_remote(run) and not storage.is_remote("runs/x")
    assert storage.resolve(run + "/") == run and storage.join(run, "a") == run + "/a"
    assert not storage.exists(run) and not storage.isdir(run)
    storage.write_text_atomic(storage.join(run, "a.json"), '{"x": 1}')
    storage.write_text_atomic(storage.join(run, "sub", "b.txt"), "b")
    storage.write_text_atomic(storage.join(run, "a.json"), '{"x": 2}')  # replaces the object
    assert storage.isdir(run) and not storage.isdir(storage.join(run, "a.json"))
    assert storage.listdir(run) == ["a.json", "sub"]
    assert json.loads(storage.read_text(storage.join(run, "a.json"))) == {"x": 2}
    with pytest.raises(MissingFileError, match="does not exist"):
        storage.read_text(storage.join(run, "nope.json"))
    with pytest.raises(MissingFileError, match="bucket does not exist"):
        storage.write_text_atomic("gs://no-such-bucket/run/a.json", "{}")
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_params(f"gs://{BUCKET}/no/run")
    assert ckpt.read_meta(f"gs://{BUCKET}/no/run") == {}


def _train(run: str, env: dict, steps: int) -> subprocess.Popen:
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
            os.path.join(ROOT, "configs", "tiny.py"), f"--config.run_dir={run}",
            f"--config.max_steps={steps}", "--config.checkpoint_interval=2"] + TINY
    return subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                     PYTHONUNBUFFERED="1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metric_steps(run: str) -> list[int]:
    text = storage.read_text(storage.join(run, "metrics.jsonl"))
    return [json.loads(line)["step"] for line in text.splitlines()]


def test_train_kill_resume_load_and_sample_in_a_bucket(gcs):
    run, n = f"gs://{BUCKET}/run", 10
    first = _train(run, gcs, n)
    committed = storage.join(run, ckpt.CHECKPOINTS, "2", "commit_success.txt")
    deadline = time.time() + 120
    while first.poll() is None and not storage.exists(committed) and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{out}"
    steps = ckpt.RunCheckpoints(run, create=False).all_steps()
    assert steps and 2 <= steps[-1] < n, steps
    for name in ("config.json", "model_config.json", "meta.json"):
        assert storage.exists(storage.join(run, name)), name
    # the task data stays on this machine's disk, not in the bucket
    assert not storage.exists(storage.join(run, "data"))
    assert os.path.isdir(os.path.join(storage.local_cache_dir(run), "data"))

    resumed = _train(run, gcs, n)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resuming {run} from step {steps[-1]}" in out
    assert _metric_steps(run) == list(range(1, n + 1))  # one row per step, none twice
    assert ckpt.RunCheckpoints(run, create=False).all_steps()[-1] == n

    cfg, params = ckpt.load_params(run)  # no eval ran: best is the latest step
    assert cfg.n_embd == 32 and params["wte"].shape == (259, 32)
    assert ckpt.read_meta(run)["tokenizer"] == "bytes"
    from reflex_jax.data import load_tokenizer
    from reflex_jax.sampling import generate
    tok = load_tokenizer("bytes")
    want = generate(cfg, params, [[1, 2, 3]], max_new_tokens=4, eos_id=tok.eos_id,
                    pad_id=tok.pad_id)[0]

    sample = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--run", run,
                             "--prompt_tokens", "1,2,3", "--max_new_tokens", "4",
                             "--print_tokens"], cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu", **gcs),
                            capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stdout + sample.stderr
    prompt, new = sample.stdout.strip().splitlines()[-1].split(" | ")
    assert prompt == "1,2,3" and [int(t) for t in new.split(",") if t] == list(want)
