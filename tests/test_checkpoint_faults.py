"""Checkpoints under faults: a damaged, truncated or corrupted newest step is detected (checksums
or the failed restore), reported by name, and the run and load_params fall back to the newest
intact step; a full disk stops a save in one sentence before anything is written; a missing
init_from or an empty checkpoints/ ends in one line; runs without evals save without warnings."""
import glob
import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from reflex_jax import checkpoint as ckpt
from reflex_jax.errors import CheckpointError
from reflex_jax.train.trainer import Trainer
from test_trainer import ROOT, overrides_cli, small_config


def _train(run, steps, **kw):
    said = []
    c = small_config(run, max_steps=steps, checkpoint_interval=2, eval_interval=2, **kw)
    summary = Trainer(c, log=said.append).train()
    return summary, said


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (with val_loss metrics); tests damage copies."""
    run = str(tmp_path_factory.mktemp("trained") / "run")
    _train(run, 4)
    assert ckpt.RunCheckpoints(run, read_only=True).all_steps() == [2, 4]
    return run


def _copy(trained, tmp_path, name):
    run = str(tmp_path / name)
    shutil.copytree(trained, run)
    return run


def _data_files(run, step):
    files = glob.glob(os.path.join(run, "checkpoints", str(step), "params", "**", "d", "*"),
                      recursive=True)
    assert files, "orbax writes the params' chunks under params/.../d/"
    return sorted(files, key=os.path.getsize)


def _damage(path, how):
    if how == "removed":
        os.remove(path)
    elif how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:  # a few KiB overwritten in the middle: the size stays, the bytes do not
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(os.urandom(min(4096, os.path.getsize(path) // 4)))


@pytest.mark.parametrize("how", ["removed", pytest.param("truncated", marks=pytest.mark.slow),
                                 pytest.param("corrupted", marks=pytest.mark.slow)])
def test_damaged_newest_step_falls_back_to_the_newest_intact_one(trained, tmp_path, how):
    run = _copy(trained, tmp_path, how)
    _damage(_data_files(run, 4)[-1], how)
    notes = []
    cfg, params = ckpt.load_params(run, which="latest", log=notes.append)
    assert any("checkpoint step 4" in n and "is damaged" in n for n in notes), notes
    assert any("restored step 2 instead of the damaged step(s) 4" in n for n in notes), notes
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 .* is damaged .*; restore "
                                              r"another step or remove it"):
        ckpt.load_params(run, step=4)
    if how != "corrupted":
        return
    # training resumes from the intact step and trains on past the damaged one
    summary, said = _train(run, 6)
    assert summary["final_step"] == 6 and f"resuming {run} from step 2" in said, said
    assert any("moved the damaged step 4" in s for s in said), said
    assert os.listdir(os.path.join(run, "damaged_checkpoints")), "nothing is deleted"
    _, params = ckpt.load_params(run, which="latest")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def test_every_step_damaged_is_one_sentence(trained, tmp_path):
    run = _copy(trained, tmp_path, "all")
    for step in (2, 4):
        _damage(_data_files(run, step)[-1], "removed")
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged \(steps 4, 2\); "
                                              r"start a new --config.run_dir"):
        ckpt.load_params(run, log=lambda s: None)


def test_garbage_metrics_of_a_step_is_damage_not_a_traceback(trained, tmp_path):
    run = _copy(trained, tmp_path, "metrics")
    metrics = os.path.join(run, "checkpoints", "4", "metrics", "metrics")
    assert os.path.exists(metrics)
    with open(metrics, "w") as f:
        f.write("not json")
    notes = []
    cfg, _ = ckpt.load_params(run, which="latest", log=notes.append)
    assert any("checkpoint step 4" in n and "is damaged (metrics/metrics has 8 bytes instead of" in n
               for n in notes), notes
    with open(metrics) as f:
        assert f.read() == "not json", "a reader changes nothing in the run directory"
    # a trainer resuming the run sets the file aside (its bytes kept) with its step
    summary, said = _train(run, 6)
    assert f"resuming {run} from step 2" in said and summary["final_step"] == 6, said
    assert glob.glob(os.path.join(run, "damaged_checkpoints", "4-*", "metrics", "metrics.unreadable"))


def _tree_state(run):
    """Every path under `run` with its size and modification time."""
    out = {}
    for root, dirs, files in os.walk(run):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            out[os.path.relpath(path, run)] = (st.st_size, st.st_mtime_ns)
    return out


def test_readers_write_move_and_delete_nothing(trained, tmp_path):
    """load_params (sample.py, export, eval, init_from all read through it) leaves a run
    directory exactly as it was: an in-progress save's temp directory, unreadable metrics and the
    checksum files are untouched."""
    run = _copy(trained, tmp_path, "readers")
    tmp_save = os.path.join(run, "checkpoints", "6.orbax-checkpoint-tmp-1796600000000000")
    os.makedirs(os.path.join(tmp_save, "params"))
    with open(os.path.join(tmp_save, "params", "partial"), "wb") as f:
        f.write(b"half a save")
    with open(os.path.join(run, "checkpoints", "2", "metrics", "metrics"), "w") as f:
        f.write("not json")
    before = _tree_state(run)
    for which in ("best", "latest"):
        step_cfg, _ = ckpt.load_params(run, which=which, log=lambda s: None)
    ckpt.load_params(run, step=4)
    reader = ckpt.RunCheckpoints(run, read_only=True)
    assert reader.all_steps() == [2, 4]  # the temp directory is no step
    with pytest.raises(CheckpointError, match="opened read-only"):
        reader.save(8, {}, {})
    reader.close()
    assert _tree_state(run) == before


@pytest.mark.slow
def test_readers_in_a_loop_never_break_a_live_trainer(tmp_path):
    """load_params in a loop against train.py saving every step: the trainer finishes (exit 0)
    and every step it kept is verified and restores; the reader saw several steps."""
    run = tmp_path / "live"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py")]
        + overrides_cli(run, max_steps=60, checkpoint_interval=1, eval_interval=10),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    seen, deadline = set(), time.monotonic() + 240  # a trainer broken by a reader may hang
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                step = ckpt.RunCheckpoints(str(run), read_only=True).pick_step(which="latest")
                ckpt.load_params(str(run), which="latest", log=lambda s: None)
                seen.add(step)
            except CheckpointError:  # no step committed yet, or one deleted while being read
                pass
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert len(seen) >= 3, seen
    reader = ckpt.RunCheckpoints(str(run), read_only=True)
    for step in reader.all_steps():
        notes = []
        assert reader.verified(step)
        ckpt.load_params(str(run), step=step, log=notes.append)
        assert not notes, notes


def test_unverified_steps_are_named_and_passed_over_for_a_verified_one(trained, tmp_path):
    """A step without its checksum file (a full disk or a kill between its commit and its
    hashing) is unverified: restores prefer a verified step and say so; with no verified step
    left, the newest intact one is restored as unverified, never called good."""
    run = _copy(trained, tmp_path, "unverified")
    sums = os.path.join(run, "checkpoint_checksums")
    os.remove(os.path.join(sums, "4.json"))
    with open(os.path.join(sums, "4.json.123.tmp"), "w") as f:  # what a failed write leaves
        f.write('{"step": 4, "fi')
    _damage(_data_files(run, 4)[-1], "corrupted")  # would restore silently without checksums
    notes = []
    ckpt.load_params(run, which="latest", log=notes.append)
    assert notes == [f"checkpoint step 4 in {run}/checkpoints is unverified (it has no checksum "
                     "file); restored the verified step 2"], notes
    shutil.rmtree(sums)  # a run saved before checksums existed: nothing is verified
    notes = []
    ckpt.load_params(run, step=2, log=notes.append)
    assert notes == [f"restored checkpoint step 2 in {run}/checkpoints unverified (it has no "
                     "checksum file): no verified step restores"], notes
    # the trainer resumes from the verified step and sets the unverified newer one aside
    run2 = _copy(trained, tmp_path, "unverified_resume")
    os.remove(os.path.join(run2, "checkpoint_checksums", "4.json"))
    summary, said = _train(run2, 6)
    assert f"resuming {run2} from step 2" in said and summary["final_step"] == 6, said
    assert any("moved the unverified step 4" in s for s in said), said


def test_a_nan_stop_never_calls_an_unverified_step_good(trained, tmp_path):
    from reflex_jax.errors import TrainingError
    run = _copy(trained, tmp_path, "nan")
    shutil.rmtree(os.path.join(run, "checkpoint_checksums"))
    with pytest.raises(TrainingError, match=r"the last checkpoint, step 4 in .*, is unverified"):
        _train(run, 8, **{"optim.lr": 1e12})


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.slow
def test_full_disk_stops_the_save_in_one_sentence(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("could not mount a tmpfs here")
    try:
        c = small_config(mount / "run", max_steps=8, checkpoint_interval=2)
        with pytest.raises(CheckpointError, match=r"not enough disk space to save step \d+ in .*: "
                                                  r"it needs about \d+ MiB and \d+ MiB are free; "
                                                  r"(steps [\d, ]+ are intact|no earlier step)"):
            Trainer(c, log=lambda s: None).train()
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
@pytest.mark.slow
def test_a_read_only_run_dir_is_one_sentence_and_still_readable(trained, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", trained, str(ro)]).returncode:
        pytest.skip("could not bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)]).returncode:
            pytest.skip("could not remount read-only here")
        out = _cli(overrides_cli(ro, max_steps=6, checkpoint_interval=2, eval_interval=2))
        assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
            f"train.py: error: cannot write to run_dir {str(ro)!r} (Read-only file system); make "
            "it writable or use another --config.run_dir (sample.py reads a run without writing "
            "to it)."), out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        notes = []
        ckpt.load_params(str(ro), which="latest", log=notes.append)  # readers need no writes
        assert not notes, notes
    finally:
        subprocess.run(["umount", str(ro)])


@pytest.mark.slow
def test_a_failed_metrics_write_is_one_sentence_and_leaves_no_torn_line(tmp_path):
    """metrics.jsonl outgrowing the file-size limit (as a full disk fails a write): one sentence,
    exit 2, and every line left in the file is whole."""
    from reflex_jax.data import prepare_task
    data = str(tmp_path / "data")
    prepare_task("mix", data, n_train=400, n_val=16, verbose=False)
    run = tmp_path / "run"
    args = ["--config", os.path.join(ROOT, "configs/tiny.py")] + overrides_cli(
        run, max_steps=400, checkpoint_interval=0, eval_interval=0) + [
        f"--config.data.dir={data}", "--config.data.task="]
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))\n"
              f"sys.argv = ['train.py'] + {args!r}\n"
              "from reflex_jax.cli.train import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"train.py: error: writing {run}/metrics.jsonl failed (File too large); free space or fix "
        "the storage, then run again: the run resumes from its last checkpoint."), out.stderr[-2000:]
    import json
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
@pytest.mark.slow
def test_a_failed_checksum_write_is_one_sentence_and_the_step_stays_unverified(tmp_path):
    run = tmp_path / "run"
    sums = run / "checkpoint_checksums"
    sums.mkdir(parents=True)
    if subprocess.run(["mount", "--bind", str(sums), str(sums)]).returncode:
        pytest.skip("could not bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(sums)]).returncode:
            pytest.skip("could not remount read-only here")
        with pytest.raises(CheckpointError, match=r"writing the checksums of checkpoint step 2 in "
                                                  r".*checkpoint_checksums failed \(.*Read-only file "
                                                  r"system.*\); the step is saved but unverified"):
            _train(str(run), 4)
    finally:
        subprocess.run(["umount", str(sums)])
    reader = ckpt.RunCheckpoints(str(run), read_only=True)
    assert 2 in reader.all_steps() and not reader.verified(2)


def _cli(args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                           os.path.join(ROOT, "configs/tiny.py")] + args, cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.slow
def test_missing_init_from_and_empty_checkpoints_are_one_line(tmp_path):
    bad = _cli(overrides_cli(tmp_path / "r", max_steps=2) + [f"--config.init_from={tmp_path}/nope"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("train.py: error: ")
    empty = tmp_path / "empty"
    os.makedirs(empty / "checkpoints")
    ckpt.write_json(str(empty / ckpt.MODEL_CONFIG), small_config(empty).model.to_dict())
    out = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--run", str(empty),
                          "--prompt_tokens", "1,2"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        f"sample.py: error: {str(empty / 'checkpoints')!r} holds no finished checkpoint; train "
        "longer (config.checkpoint_interval) or pick another run directory."]


@pytest.mark.slow
def test_runs_without_evals_save_without_warnings(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        Trainer(small_config(tmp_path / "quiet", max_steps=4, checkpoint_interval=2,
                             eval_interval=0), log=lambda s: None).train()
        # saves between evals (steps 2 and 6 here) carry no metrics, and say nothing of it
        Trainer(small_config(tmp_path / "between", max_steps=8, checkpoint_interval=2,
                             eval_interval=4), log=lambda s: None).train()
    assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()]
