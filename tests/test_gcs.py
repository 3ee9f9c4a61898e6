"""Run directories in a bucket: train.py into gs://bucket/run on a local GCS emulator (loopback
only), killed after a checkpoint and resumed; load_params, read_checkpoint_meta and sample.py read
it back.

gcsfs carries the small run files and orbax/tensorstore the checkpoints, each pointed at the
emulator by its environment variable (see reflex_jax/storage.py)."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from reflex_jax import checkpoint as ckpt
from reflex_jax import storage
from reflex_jax.errors import CheckpointError, MissingFileError, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"
TINY = ["--config.model.n_layer=2", "--config.model.n_head=4", "--config.model.n_embd=32",
        "--config.model.block_size=32", "--config.data.task_rows=400",
        "--config.data.task_val_rows=16", "--config.batch_size=8", "--config.eval_interval=0",
        "--config.eval_exact_match=0", "--config.log_interval=1", "--config.optim.warmup_steps=2",
        "--config.data.loss_on=all", "--config.async_checkpoints=False"]


def _missing() -> str:
    # find_spec, not import: gcsfs picks its filesystem class from the environment at import
    for module, package in (("gcp_storage_emulator", "gcp-storage-emulator"), ("gcsfs", "gcsfs")):
        if importlib.util.find_spec(module) is None:
            return package
    return ""


def _patch_emulator():
    """Three parts of the GCS JSON API that tensorstore relies on and gcp-storage-emulator lacks:
    the x-goog-generation header of a media read (an OCDBT manifest is read, then rewritten only
    if that generation still holds), ifGenerationMatch on uploads, and listing by
    startOffset/endOffset (tensorstore lists a key range, not a prefix)."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects
    if getattr(objects, "_reflex_patched", False):
        return
    download, insert, ls = objects.download, objects.insert, objects.ls

    def generation(store, bucket, name) -> str:
        try:
            return store.get_file_obj(bucket, name)["generation"]
        except NotFound:
            return "0"

    def download_with_generation(request, response, store, *args, **kwargs):
        download(request, response, store, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = generation(
                store, request.params["bucket_name"], request.params["object_id"])
            response["x-goog-metageneration"] = "1"

    def insert_if_generation_matches(request, response, store, *args, **kwargs):
        want, name = request.query.get("ifGenerationMatch"), request.query.get("name")
        if want and name and generation(store, request.params["bucket_name"], name[0]) != want[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        return insert(request, response, store, *args, **kwargs)

    def ls_in_key_range(request, response, store, *args, **kwargs):
        ls(request, response, store, *args, **kwargs)
        start = (request.query.get("startOffset") or [""])[0]
        end = (request.query.get("endOffset") or [None])[0]
        if response.status != HTTPStatus.OK or not (start or end):
            return
        body = json.loads(response._content)
        inside = lambda name: start <= name and (end is None or name < end)  # noqa: E731
        body["items"] = [o for o in body["items"] if inside(o["name"])]
        body["prefixes"] = [p for p in body["prefixes"] if inside(p)]
        response.json(body)

    objects.download, objects.insert, objects.ls = (download_with_generation,
                                                    insert_if_generation_matches, ls_in_key_range)
    objects._reflex_patched = True


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
        pytest.skip(f"{missing} is not installed (pip install gcp-storage-emulator gcsfs)")
    _patch_emulator()  # before the server module binds its routes to these handlers
    from gcp_storage_emulator.server import create_server
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    env = _emulator_env(f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("gcs"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config  # read FSSPEC_* at import, which may have happened already
    import gcsfs.core
    gcs_conf = fsspec.config.conf.get("gcs")
    fsspec.config.conf["gcs"] = dict(gcs_conf or {}, token="anon")
    for protocol in ("gs", "gcs"):  # the plain class, whenever gcsfs was imported
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
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


def test_local_paths_and_remote_ones_without_their_package(tmp_path):
    local = storage.join(str(tmp_path), "run", "a.json")
    assert not storage.is_remote(local) and storage.resolve("~/x") == os.path.expanduser("~/x")
    storage.makedirs(os.path.dirname(local))
    storage.write_text_atomic(local, "{}")
    assert storage.read_text(local) == "{}" and storage.listdir(os.path.dirname(local)) == ["a.json"]
    with pytest.raises(UsageError, match="ftp://, which is not supported"):
        storage.exists("ftp://host/run")
    if importlib.util.find_spec("adlfs") is None:
        with pytest.raises(UsageError, match="adlfs is not installed; pip install adlfs"):
            storage.exists("az://container/run")


@pytest.mark.slow
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
    assert ckpt.read_checkpoint_meta(f"gs://{BUCKET}/no/run") == {}


@pytest.mark.slow
def test_params_directory_in_a_bucket(gcs):
    """What convert_weights.py writes (save_params), written twice to one gs:// directory (the
    second replaces the first) and loaded back."""
    import jax
    import numpy as np

    from reflex_jax.model import ModelConfig, init_params
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=64, block_size=16)
    out = f"gs://{BUCKET}/weights/tiny"
    ckpt.save_params(out, cfg, init_params(cfg, jax.random.PRNGKey(0)), {"tokenizer": "bytes"})
    params = init_params(cfg, jax.random.PRNGKey(1))
    assert ckpt.save_params(out + "/", cfg, params, {"tokenizer": "bytes", "v": 2}) == out
    got_cfg, got = ckpt.load_params(out)
    assert got_cfg == cfg and ckpt.read_checkpoint_meta(out) == {"tokenizer": "bytes", "v": 2}
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, got)


def _train(run: str, env: dict, steps: int) -> subprocess.Popen:
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
            os.path.join(ROOT, "configs", "tiny.py"), f"--config.run_dir={run}",
            f"--config.max_steps={steps}", "--config.checkpoint_interval=2"] + TINY
    return subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                     PYTHONUNBUFFERED="1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(run: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(run, "metrics.jsonl"))
            .splitlines()]


@pytest.mark.slow
def test_train_kill_resume_load_and_sample_in_a_bucket(gcs):
    # a step takes milliseconds and a save about 0.3 s, so on a busy machine the kill can land
    # several saves late: 16 steps leave room for that, and only the last 3 saves are kept
    run, n = f"gs://{BUCKET}/run", 16
    first = _train(run, gcs, n)
    checkpoints = storage.join(run, ckpt.CHECKPOINTS)
    # killed as soon as step 4's save has begun: in a bucket orbax writes the step in place and
    # adds commit_success.txt last, so an unfinished step is there but is not a step
    deadline = time.time() + 120
    while (first.poll() is None and not storage.isdir(storage.join(checkpoints, "4"))
           and time.time() < deadline):
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{out}"
    finished = [int(s) for s in storage.listdir(checkpoints) if s.isdigit()
                and storage.exists(storage.join(checkpoints, s, "commit_success.txt"))]
    steps = ckpt.RunCheckpoints(run, read_only=True).all_steps()
    assert steps and steps == sorted(finished) and steps[-1] < n, (steps, finished)
    assert all(s % 2 == 0 for s in steps) and len(steps) <= 3, steps
    killed_rows = _metrics(run)
    assert [r["step"] for r in killed_rows] == list(range(1, len(killed_rows) + 1))
    assert len(killed_rows) > steps[-1], "the killed run logged steps after its last checkpoint"
    for name in ("config.json", "model_config.json", "meta.json"):
        assert storage.exists(storage.join(run, name)), name
    # the task data stays on this machine's disk, not in the bucket
    assert not storage.exists(storage.join(run, "data"))
    assert os.path.isdir(os.path.join(storage.local_cache_dir(run), "data"))

    resumed = _train(run, gcs, n)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resuming {run} from step {steps[-1]}" in out
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, n + 1))  # one row per step, none twice
    # restored from the bucket exactly: the steps the killed run took past its checkpoint come
    # out with the same losses (they need the saved params and optimizer moments bit for bit)
    assert [r["loss"] for r in rows[:len(killed_rows)]] == [r["loss"] for r in killed_rows]
    assert ckpt.RunCheckpoints(run, read_only=True).all_steps()[-1] == n

    cfg, params = ckpt.load_params(run)  # no eval ran: best is the latest step
    assert cfg.n_embd == 32 and params["wte"].shape == (259, 32)
    assert ckpt.read_checkpoint_meta(run)["tokenizer"] == "bytes"
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


@pytest.mark.slow
def test_prepare_into_a_bucket_and_read_only_the_windows_of_this_host(gcs, tmp_path, monkeypatch):
    """`prepare --out gs://...` writes the same files as a local preparation (meta.json last; the
    same preparation again is up to date, another one refused without --overwrite), and a loader
    on the bucket reads by range only the chunks its own rows' windows touch, giving the local
    batches exactly."""
    from reflex_jax.cli.data import main as data_main
    from reflex_jax.data import BatchLoader, TokenData, prepare, ranged
    from reflex_jax.errors import DataError
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i} " * (i % 7 + 1), "answer": f"a{i}"},
                                       ensure_ascii=False) + "\n" for i in range(300)),
                    encoding="utf-8")
    remote, local = f"gs://{BUCKET}/data/rows", str(tmp_path / "rows")
    for out in (local, remote):
        assert data_main(["prepare", "--source", str(rows), "--tokenizer", "bytes", "--out", out,
                          "--val_fraction", "0.1"]) == 0
    assert storage.listdir(remote) == sorted(os.listdir(local))
    for name in os.listdir(local):
        if name != "meta.json":
            with open(os.path.join(local, name), "rb") as f:
                assert storage.read_bytes(storage.join(remote, name)) == f.read(), name
    assert data_main(["prepare", "--source", str(rows), "--tokenizer", "bytes", "--out", remote,
                      "--val_fraction", "0.1"]) == 0  # up to date
    with pytest.raises(DataError, match="already holds data prepared from"):
        prepare(str(rows), "bytes", remote, val_fraction=0.2, verbose=False)
    monkeypatch.setattr(ranged, "CHUNK_BYTES", 256)
    on_bucket, on_disk = TokenData.open(remote), TokenData.open(local)
    assert on_bucket.remote and not on_disk.remote
    loaders = [BatchLoader(d, "train", 8, 16, seed=3, process_index=1, process_count=2,
                           documents=True) for d in (on_bucket, on_disk)]
    for step in range(5):
        a, b = (x.batch(step) for x in loaders)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    tokens = on_bucket.split("train")
    size = len(tokens) * tokens.dtype.itemsize
    assert 0 < tokens.fetched_bytes < size / 2, (tokens.fetched_bytes, size)
    cache = os.path.join(on_bucket._files, "chunks", "train.tokens.bin")
    assert len(os.listdir(cache)) == tokens.fetched_bytes // 256 + (tokens.fetched_bytes % 256 > 0)


@pytest.mark.slow
def test_training_on_data_in_a_bucket_equals_the_local_copy(gcs, tmp_path):
    """data.dir=gs://...: each host reads its windows by range (cached on its disk: a second run
    reuses the cache) and trains exactly as on the local directory, resume included; a bucket
    path without a prepared directory is one sentence."""
    from reflex_jax.data import prepare_task
    local = str(tmp_path / "kv")
    remote = f"gs://{BUCKET}/data/kv"
    for out in (local, remote):
        prepare_task("kv_recall", out, n_train=400, n_val=16, verbose=False)
    runs = {"bucket": (str(tmp_path / "rb"), remote), "local": (str(tmp_path / "rl"), local)}
    for steps in (4, 6):  # 6: a resume from step 4
        for run, data_dir in runs.values():
            args = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
                    os.path.join(ROOT, "configs", "tiny.py"), f"--config.run_dir={run}",
                    f"--config.max_steps={steps}", "--config.checkpoint_interval=2",
                    f"--config.data.dir={data_dir}", "--config.data.task="] + TINY
            done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                  env=dict(os.environ, JAX_PLATFORMS="cpu", **gcs))
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = {k: _metrics(run) for k, (run, _) in runs.items()}
    assert [r["step"] for r in rows["bucket"]] == list(range(1, 7))
    assert [r["loss"] for r in rows["bucket"]] == [r["loss"] for r in rows["local"]]
    cache, = os.listdir(storage.local_cache_dir(remote))  # one preparation's cache
    cache = os.path.join(storage.local_cache_dir(remote), cache)
    assert sorted(os.listdir(cache)) == ["chunks", "meta.json", "train.offsets.npy",
                                         "train.source_rows.npy", "val.offsets.npy",
                                         "val.source_rows.npy"]
    meta = json.loads(open(os.path.join(runs["bucket"][0], "meta.json")).read())
    assert meta["data_dir"] == remote
    empty = subprocess.run(args[:-len(TINY) - 2] + [f"--config.data.dir=gs://{BUCKET}/nothing",
                                                    "--config.data.task="] + TINY,
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, JAX_PLATFORMS="cpu", **gcs))
    assert empty.returncode == 2 and empty.stderr.strip().splitlines()[-1].startswith(
        f"train.py: error: data directory 'gs://{BUCKET}/nothing' holds no meta.json"), empty.stderr
