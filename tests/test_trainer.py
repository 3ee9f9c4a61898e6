"""Training loop: learning, gradient accumulation, exact resume after SIGKILL, atomic saves, NaN
stops, and config errors that name the fix."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from reflex_jax import checkpoint as ckpt
from reflex_jax.errors import TrainingError
from reflex_jax.run_config import load_config
from reflex_jax.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
    return load_config(os.path.join(ROOT, "configs", "tiny.py"))


TINY_OVERRIDES = dict(n_layer=2, n_head=4, n_embd=32, block_size=32)


def small_config(run_dir, **kw):
    c = tiny_config()
    for k, v in TINY_OVERRIDES.items():
        c.model[k] = v
    c.run_dir = str(run_dir)
    c.data.task_rows, c.data.task_val_rows = 400, 16
    c.max_steps, c.batch_size, c.eval_interval, c.eval_batches = 8, 8, 0, 2
    c.log_interval, c.checkpoint_interval, c.eval_exact_match = 1, 0, 0
    c.optim.warmup_steps = 2
    c.data.loss_on = "all"  # task rows are longer than these 32-token windows
    c.async_checkpoints = False
    for k, v in kw.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def overrides_cli(run_dir, **kw):
    args = [f"--config.model.{k}={v}" for k, v in TINY_OVERRIDES.items()]
    args += [f"--config.run_dir={run_dir}", "--config.data.task_rows=400",
             "--config.data.task_val_rows=16", "--config.batch_size=8", "--config.eval_batches=2",
             "--config.eval_exact_match=0", "--config.log_interval=1", "--config.optim.warmup_steps=2",
             "--config.data.loss_on=all"]
    return args + [f"--config.{k}={v}" for k, v in kw.items()]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_decreases_and_run_dir_is_complete(tmp_path):
    c = small_config(tmp_path / "run", max_steps=30, eval_interval=15)
    c.optim.lr = 3e-3
    summary = Trainer(c, log=lambda s: None).train()
    rows = read_metrics(c.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert np.mean([r["loss"] for r in rows[-5:]]) < rows[0]["loss"] - 1.0
    assert {"val_loss", "val_ppl"} <= set(rows[14]) and "val_loss" not in rows[13]
    assert summary["final_step"] == 30
    for name in ("config.json", "model_config.json", "meta.json"):
        assert os.path.exists(os.path.join(c.run_dir, name))
    cfg, params = ckpt.load_params(c.run_dir, which="latest")
    assert cfg.n_embd == 32 and params["wte"].shape == (259, 32)
    steps = ckpt.RunCheckpoints(c.run_dir, read_only=True).all_steps()
    assert steps == [15, 30]


@pytest.mark.slow
def test_block_size_below_the_init_length_trains(tmp_path):
    """The model is initialised with a dummy batch no longer than block_size (one helper for
    every caller): a 4-token block builds, compiles and takes a finite step."""
    c = small_config(tmp_path / "b4", max_steps=2, **{"model.block_size": 4})
    summary = Trainer(c, log=lambda s: None).train()
    assert summary["final_step"] == 2 and np.isfinite(summary["loss"])
    _, params = ckpt.load_params(c.run_dir, which="latest")
    assert params["wpe"].shape == (4, 32)


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch(tmp_path):
    states = {}
    for accum in (1, 4):
        c = small_config(tmp_path / f"a{accum}", max_steps=1, grad_accum=accum)
        t = Trainer(c, log=lambda s: None)
        state = t.program.init_state()
        states[accum], m = t.program.train_step(state, t.program.put_batch(t.train_loader.batch(0)))
        states[accum] = (jax.device_get(states[accum].params), float(m["loss"]))
    assert abs(states[1][1] - states[4][1]) < 1e-5
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5),
                           states[1][0], states[4][0])


def _run_train(args, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                             os.path.join(ROOT, "configs/tiny.py")] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    n, half = 40, 10
    straight = _run_train(overrides_cli(tmp_path / "straight", max_steps=n, checkpoint_interval=0,
                                        async_checkpoints=False))
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out

    killed_dir = tmp_path / "killed"
    proc = _run_train(overrides_cli(killed_dir, max_steps=n, checkpoint_interval=half,
                                    async_checkpoints=False))
    done = killed_dir / "checkpoints" / str(half)
    deadline = time.time() + 600
    while not done.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    steps = ckpt.RunCheckpoints(str(killed_dir), read_only=True).all_steps()
    assert steps and steps[-1] < n, f"the run finished before it was killed: {steps}"

    resumed = _run_train(overrides_cli(killed_dir, max_steps=n, checkpoint_interval=half,
                                       async_checkpoints=False))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"resuming {killed_dir} from step {steps[-1]}" in out
    _, p_straight = ckpt.load_params(str(tmp_path / "straight"), which="latest")
    _, p_resumed = ckpt.load_params(str(killed_dir), which="latest")
    # bitwise: same compiled step, same batches (pure in (seed, step)), same dropout keys
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_straight, p_resumed)
    loss = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    resumed_rows = read_metrics(killed_dir)
    assert [r["step"] for r in resumed_rows] == list(range(1, n + 1))  # no duplicated steps
    assert all(loss[r["step"]] == r["loss"] for r in resumed_rows)


KILL_MID_SAVE = r"""
import os, signal, sys
import jax.numpy as jnp
from reflex_jax.checkpoint import RunCheckpoints
ck = RunCheckpoints(sys.argv[1], async_save=True)
small = {"w": jnp.ones((4,))}
ck.save(1, small, {"mu": jnp.zeros((4,))})
ck.wait()
big = {"w": jnp.ones((64, 1024, 1024))}  # 256 MiB: the background write takes a while
ck.save(2, big, {"mu": jnp.zeros((4,))})
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_checkpoint_killed_mid_save_never_becomes_latest(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path)], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = os.listdir(tmp_path / "checkpoints")
    assert "2" not in leftovers
    ck = ckpt.RunCheckpoints(str(tmp_path), read_only=True)
    assert ck.latest_step() == 1 and ck.all_steps() == [1]
    np.testing.assert_array_equal(ck.restore_params(1)["w"], np.ones(4))


@pytest.mark.parametrize("lr, clip", [(1e12, 0.0), (1e6, 1.0)])
@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, lr, clip):
    """A diverging run stops at the first non-finite loss or gradient norm, and the checkpoint it
    names as the last good one really is: every parameter of it is finite (the gradient norm of
    the update that made a step's params is checked, not only the loss before it)."""
    c = small_config(tmp_path / "nan", max_steps=30, checkpoint_interval=1, log_interval=1)
    c.optim.lr, c.optim.min_lr, c.optim.clip, c.optim.warmup_steps = lr, lr, clip, 0
    with pytest.raises(TrainingError, match=r"(the loss|the gradient norm) became (nan|inf) at "
                                            r"step (\d+); stopping without saving \(the last good "
                                            r"checkpoint is step \d+") as e:
        Trainer(c, log=lambda s: None).train()
    ck = ckpt.RunCheckpoints(c.run_dir, read_only=True)
    rows = read_metrics(c.run_dir)
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert ck.all_steps(), "the good steps before the NaN were saved"
    assert ck.latest_step() < bad and str(ck.latest_step()) in str(e.value)
    latest_loss = {r["step"]: r["loss"] for r in rows}.get(ck.latest_step())
    assert latest_loss is None or np.isfinite(latest_loss)
    _, params = ckpt.load_params(c.run_dir, which="latest")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def test_config_errors_are_one_sentence_before_compiling(tmp_path):
    c = small_config(tmp_path / "v", **{"model.vocab_size": 100})
    with pytest.raises(TrainingError, match=r"259-token vocabulary but model.vocab_size=100; set "
                                            r"--config.model.vocab_size=259"):
        Trainer(c)
    c = small_config(tmp_path / "d", **{"data.dir": str(tmp_path / "nowhere")})
    with pytest.raises(TrainingError, match=r"data directory .*nowhere' does not exist"):
        Trainer(c)
    with pytest.raises(TrainingError, match=r"batch_size=8 must be a positive multiple of grad_accum=3"):
        Trainer(small_config(tmp_path / "b", grad_accum=3))
    with pytest.raises(ValueError, match=r"config.mesh data\*fsdp\*tensor = 2 but there are 1 devices"):
        Trainer(small_config(tmp_path / "m", **{"mesh.data": 2}))
    with pytest.raises(ValueError, match=r"unknown model config field 'n_heads'"):
        c = small_config(tmp_path / "f")
        c.model.unlock()
        c.model.n_heads = 4
        Trainer(c)


def test_answer_only_loss_reaches_answers_past_the_window(tmp_path):
    """Task rows are longer than these 33-token windows: windows also start inside rows, so the
    answers are trained on (this once raised "no answer tokens within block_size")."""
    t = Trainer(small_config(tmp_path / "ans", **{"data.loss_on": "answer"}), log=lambda s: None)
    reach = t.train_loader.reach
    assert reach["long_rows"] > 0 and reach["answer_tokens"] > 0
    assert reach["unreachable_answer_tokens"] == 0
    assert any(np.asarray(t.train_loader.batch(s)["mask"])[:, 1:].any() for s in range(4))
    with pytest.raises(TrainingError, match=r"eval_exact_match needs prompt \+ answer = \d+ tokens but "
                                            r"model.block_size=32"):
        Trainer(small_config(tmp_path / "em", eval_exact_match=8, eval_interval=5))


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused(tmp_path):
    c = small_config(tmp_path / "r", max_steps=2)
    Trainer(c, log=lambda s: None).train()
    with pytest.raises(TrainingError, match=r"holds checkpoints of a different model \(model.n_embd "
                                            r"differs\); use a new --config.run_dir"):
        Trainer(small_config(tmp_path / "r", max_steps=4, **{"model.n_embd": 64})).train()
    other = small_config(tmp_path / "other", init_from=c.run_dir, **{"model.n_layer": 3})
    with pytest.raises(ValueError, match=r"lacks parameter \['h_2'\]"):
        Trainer(other, log=lambda s: None).train()


@pytest.mark.slow
def test_train_cli_default_config_prints_checkpoint(tmp_path):
    args = overrides_cli(tmp_path / "cli", max_steps=3, eval_interval=3, checkpoint_interval=0,
                         eval_exact_match=4)
    proc = _run_train(args + ["--config.model.block_size=96", "--config.data.task_options.max_operand=9",
                              "--config.data.task_options.ops=plus,minus"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"checkpoints: {tmp_path / 'cli' / 'checkpoints'}" in out
    assert "exact_match" in read_metrics(tmp_path / "cli")[-1]
    meta = json.load(open(tmp_path / "cli" / "data" / "meta.json"))
    assert meta["source"]["options"]["max_operand"] == 9  # task options reach the generator
    assert "n_pairs" not in meta["source"]["options"]      # only the options arith has
    bad = _run_train(["--config.model.norm=batchnorm"])
    out, _ = bad.communicate(timeout=300)
    assert bad.returncode == 2
    assert out.strip().splitlines()[-1] == ("train.py: error: model.norm='batchnorm' is unknown; "
                                            "use one of rmsnorm | layernorm.")


@pytest.mark.slow
def test_a_running_trainer_holds_the_run_dir_and_sigterm_saves_and_exits_75(tmp_path):
    run = tmp_path / "term"
    proc = _run_train(overrides_cli(run, max_steps=400, checkpoint_interval=0,
                                    async_checkpoints=False))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 2:
                break
            time.sleep(0.2)
        assert (run / "train.lock").exists(), "the trainer holds the lock while it runs"
        data_meta = (run / "data" / "meta.json").read_text()
        with pytest.raises(TrainingError, match=rf"run_dir .* is in use by process {proc.pid} on "
                                                r".*; wait for that run, use another"):
            # other task options: refused before it regenerates the running run's task data
            Trainer(small_config(run, max_steps=2, **{"data.task_options.max_value": 5}),
                    log=lambda s: None).train()
        assert (run / "data" / "meta.json").read_text() == data_meta
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, out
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", out).group(1))
    assert ckpt.RunCheckpoints(str(run), read_only=True).latest_step() == step
    assert not (run / "train.lock").exists(), "a clean stop releases the lock"
    # a lock left behind by a trainer that was killed (its pid is gone) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead)}))
    said = []
    summary = Trainer(small_config(run, max_steps=step + 1), log=said.append).train()
    assert summary["final_step"] == step + 1 and not (run / "train.lock").exists()
    assert any(f"stale lock of process {dead}" in s for s in said), said


@pytest.mark.slow
def test_resume_logs_changed_settings_keeps_every_config_and_refuses_changed_data(tmp_path):
    run = tmp_path / "hist"
    Trainer(small_config(run, max_steps=2), log=lambda s: None).train()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a kill in the middle of writing a row: dropped
    # the run's config.json as a run from before model.reflex was renamed model.head_plan wrote it
    stored = json.load(open(run / "config.json"))
    stored["model"]["reflex"] = stored["model"].pop("head_plan")
    json.dump(stored, open(run / "config.json", "w"))
    said = []
    c = small_config(run, max_steps=4)
    c.optim.lr = 1e-3  # configs/tiny.py says 3e-3
    Trainer(c, log=said.append).train()
    assert any(s.startswith("resuming with changed settings: ") and "max_steps 2 -> 4" in s
               and "optim.lr 0.003 -> 0.001" in s for s in said), said
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    history = json.load(open(run / "config_history.json"))
    assert [h["start_step"] for h in history] == [0, 2]
    assert history[0]["config"]["optim"]["lr"] == 3e-3 and history[1]["config"]["optim"]["lr"] == 1e-3
    assert history[1]["changed"]["max_steps"] == [2, 4]
    assert not [k for k in history[1]["changed"] if k.startswith("model.")]  # a rename is no change
    # other data under the same run: refused in one sentence, unless asked
    other = small_config(run, max_steps=6, **{"data.task_rows": 300})
    with pytest.raises(TrainingError, match=r"was trained on data with fingerprint \w+ but .* now "
                                            r"holds data with fingerprint \w+; resume on the data"):
        Trainer(other, log=lambda s: None).train()
    other.data.resume_on_changed_data = True
    said = []
    assert Trainer(other, log=said.append).train()["final_step"] == 6
    assert any("resuming on changed data" in s for s in said)


def test_the_progress_bar_times_training_not_the_first_compile(tmp_path):
    """The first call of the step compiles (slow); the bar starts after it returns, so its rate
    and ETA are of training alone (started before, a minute's run read hours)."""
    import jax.numpy as jnp
    from reflex_jax.run_config import model_config_from
    from reflex_jax.train.loop import TrainLoop
    from reflex_jax.train.step import TrainState
    c = small_config(tmp_path / "bar", max_steps=5, log_interval=0)
    checkpoints = ckpt.RunCheckpoints(c.run_dir, async_save=False, track_best=False)
    loop = TrainLoop(c, model_config_from(c), checkpoints, 0, evaluate=lambda p: {},
                     stop_at=lambda s: False)
    calls = []

    def step(state, batch):
        if not calls:
            time.sleep(1.5)  # the compile
        calls.append(1)
        return state, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0), "lr": jnp.float32(0.1)}
    state = TrainState(step=jnp.int32(0), params={"w": jnp.ones(2)}, opt_state={"m": jnp.zeros(2)})
    try:
        loop.run(state, step, lambda s: {})
        assert loop.bar.n == 5 and loop.bar.format_dict["elapsed"] < 1.0
    finally:
        loop.close()


def test_a_time_based_save_comes_before_the_step_interval(tmp_path, monkeypatch):
    """checkpoint_minutes saves once that much time passed since the last save, whichever of it
    and checkpoint_interval comes first. A fake clock, 20 s later at each read (one read per step,
    one per save): the 1.5-minute limit is reached at step 5; 7 is the final save."""
    import reflex_jax.train.loop as loop_module
    c = small_config(tmp_path / "timed", max_steps=7, checkpoint_interval=100,
                     checkpoint_minutes=1.5)
    now = [0.0]

    def clock():
        now[0] += 20.0
        return now[0]
    real = loop_module.TrainLoop.__init__
    monkeypatch.setattr(loop_module.TrainLoop, "__init__",
                        lambda self, *a, **kw: real(self, *a, **dict(kw, clock=clock)))
    Trainer(c, log=lambda s: None).train()
    assert ckpt.RunCheckpoints(c.run_dir, read_only=True).all_steps() == [5, 7]


def test_checkpoint_minutes_is_checked():
    from reflex_jax.train.checks import check_run_config
    c = small_config("/tmp/unused", checkpoint_minutes=-1.0)
    with pytest.raises(TrainingError, match=r"checkpoint_minutes=-1.0 must be a number >= 0"):
        check_run_config(c)


def test_prefetched_batches_are_the_same_batches(tmp_path):
    """data.prefetch reads the next batches on a thread while the step runs: the losses are those
    of reading each batch in the step's path, bit for bit."""
    losses = {}
    for prefetch in (0, 2):
        run = tmp_path / f"p{prefetch}"
        Trainer(small_config(run, max_steps=6, **{"data.prefetch": prefetch}),
                log=lambda s: None).train()
        losses[prefetch] = [r["loss"] for r in read_metrics(run)]
    assert len(losses[0]) == 6 and losses[0] == losses[2]


def test_a_profile_window_writes_a_trace_and_rows_carry_step_and_data_time(tmp_path):
    run = tmp_path / "prof"
    Trainer(small_config(run, max_steps=5, profile_steps="2:4"), log=lambda s: None).train()
    traces = [os.path.join(root, f) for root, _, files in os.walk(run / "profile") for f in files]
    assert any(t.endswith(".xplane.pb") for t in traces), traces
    rows = read_metrics(run)
    assert all(r["step_s"] > 0 and 0 <= r["data_wait_s"] <= r["step_s"] for r in rows), rows
    with pytest.raises(TrainingError, match=r"profile_steps='4:2' must be START:END"):
        Trainer(small_config(tmp_path / "bad", profile_steps="4:2"), log=lambda s: None)
