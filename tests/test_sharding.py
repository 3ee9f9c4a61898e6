"""Mesh runs: logical axis rules, host-contiguous meshes on deviceless TPU pods, 8 fake CPU devices
vs one device, orbax restore onto another mesh, the --dry_run report, and a real 2-process
(loopback, gloo) run that is killed and resumed.

The fake-device flag must be set before jax is imported and this process already imported jax
with one device, so the 8-device checks run in subprocesses (tests/sharding_worker.py, train.py).
"""
import functools
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
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from reflex_jax import checkpoint as ckpt
from reflex_jax import sharding
from reflex_jax.model import abstract_params

from marks import needs_libtpu  # skips, naming the plugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


# ---- rules and flags (no devices needed) -----------------------------------------------------

def test_mesh_shape_resolves_the_rest_and_rejects_bad_sizes():
    assert sharding.mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    assert sharding.mesh_shape(1, 1, -1, 8) == (1, 1, 8)
    with pytest.raises(sharding.MeshError, match=r"data\*fsdp\*tensor = 4 but there are 8 devices"):
        sharding.mesh_shape(2, 2, 1, 8)
    with pytest.raises(sharding.MeshError, match=r"8 devices do not divide by 3"):
        sharding.mesh_shape(-1, 3, 1, 8)
    with pytest.raises(sharding.MeshError, match=r"at most one of config.mesh.data/fsdp/tensor may be -1"):
        sharding.mesh_shape(-1, -1, 1, 8)
    with pytest.raises(sharding.MeshError, match=r"must be positive or -1"):
        sharding.mesh_shape(0, 1, 1, 8)


def test_rules_split_only_dimensions_that_divide():
    kv = P("embed", "kv_heads", "head_dim")
    m222 = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    m118 = AbstractMesh((1, 1, 8), sharding.MESH_AXES)
    m241 = AbstractMesh((2, 4, 1), sharding.MESH_AXES)
    assert sharding.spec_for(kv, (64, 6, 8), m222) == P("fsdp", "tensor")
    assert sharding.spec_for(kv, (64, 7, 8), m222) == P("fsdp")  # 7 K/V heads: replicate
    assert sharding.spec_for(kv, (64, 8, 8), m118) == P(None, "tensor")
    assert sharding.spec_for(kv, (64, 6, 8), m118) == P()
    assert sharding.spec_for(P("vocab", "embed"), (259, 64), m241) == P(None, "fsdp")
    assert sharding.spec_for(P("vocab", "embed"), (256, 64), m118) == P("tensor")
    assert sharding.spec_for(P("embed", "mlp"), (30, 256), m241) == P()  # 30 % 4 != 0
    assert sharding.batch_shards(m241) == 8 and sharding.batch_shards(m118) == 1


def test_multihost_flags_are_checked_before_any_connection():
    with pytest.raises(ValueError, match=r"--coordinator='nohost' must be host:port"):
        sharding.maybe_initialize_distributed("nohost", 2, 0)
    with pytest.raises(ValueError, match=r"--coordinator needs --num_processes and --process_id"):
        sharding.maybe_initialize_distributed("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"--process_id=2 must be below --num_processes=2"):
        sharding.maybe_initialize_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match=r"--num_processes/--process_id need --coordinator"):
        sharding.maybe_initialize_distributed("", 2, 1)
    with pytest.raises(ValueError, match=r"either --multihost .* or --coordinator, not both"):
        sharding.maybe_initialize_distributed("127.0.0.1:1234", 2, 0, auto=True)
    assert sharding.maybe_initialize_distributed() is False  # nothing asked, nothing started


# ---- TPU pods compiled deviceless: every host keeps its batch rows together ------------------

@functools.lru_cache(maxsize=None)
def _tpu(topology: str, slices: int = 1) -> tuple:
    """Compile-only devices of a TPU topology, with the process_index and coords of the real pod."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no libtpu lock: others compile too
    from jax.experimental import topologies
    kw = {"num_slices": slices} if slices > 1 else {}
    return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw).devices)


def _host_blocks(mesh) -> dict:
    """{process: (block, blocks)} of the batch rows each process must load (process_rows raises
    unless they are one contiguous block), after checking that the blocks tile the batch evenly
    and that a tensor group that fits in a host stays in it."""
    procs_BT = np.vectorize(lambda d: d.process_index)(mesh.devices).reshape(-1, mesh.shape["tensor"])
    n_procs = len(np.unique(procs_BT))
    batch, rows = sharding.batch_sharding(mesh), sharding.batch_shards(mesh)
    blocks = {int(p): sharding.process_rows(batch, rows, process_index=int(p))
              for p in np.unique(procs_BT)}
    count = {c for _, c in blocks.values()}
    assert len(count) == 1, blocks
    owners = [sum(b == i for b, _ in blocks.values()) for i in range(count.pop())]
    assert len(set(owners)) == 1 and sum(owners) == n_procs, blocks
    if (mesh.devices.size // n_procs) % mesh.shape["tensor"] == 0:
        assert (procs_BT == procs_BT[:, :1]).all(), procs_BT
    return blocks


PODS = [("v5p:2x2x2", [(-1, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)]),
        ("v5p:4x4x2", [(-1, 1, 1), (1, 32, 1), (2, 16, 1), (1, 8, 4), (4, 4, 2)]),
        ("v5p:2x4x4", [(1, 32, 1), (4, 8, 1), (1, 8, 4), (8, 2, 2)])]


@needs_libtpu
@pytest.mark.parametrize("topology,meshes", PODS, ids=[t for t, _ in PODS])
def test_pod_meshes_give_every_host_one_block_of_rows(topology, meshes):
    devices = _tpu(topology)
    hosts = len({d.process_index for d in devices})
    for sizes in meshes:
        mesh = sharding.make_mesh(*sizes, devices=devices)
        assert mesh.devices.shape == sharding.mesh_shape(*sizes, len(devices))
        assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
        blocks = _host_blocks(mesh)
        if sizes[2] <= len(devices) // hosts:  # the batch is split over all hosts
            assert sorted(blocks.values()) == [(i, hosts) for i in range(hosts)], (sizes, blocks)
    # tensor=8 over 2 hosts of 4: each host holds part of every row, so loads the whole batch
    whole = sharding.make_mesh(1, 1, 8, devices=_tpu("v5p:2x2x2"))
    assert _host_blocks(whole) == {0: (0, 1), 1: (0, 1)}


@needs_libtpu
def test_physical_order_interleaves_hosts_and_make_mesh_does_not():
    devices = _tpu("v5p:2x2x2")
    physical = Mesh(mesh_utils.create_device_mesh((8, 1, 1), devices), sharding.MESH_AXES)
    with pytest.raises(sharding.MeshError, match=re.escape(
            "process 0's devices hold rows [(0, 2), (4, 6), (8, 10), (12, 14)] of a 16-row batch")):
        sharding.process_rows(sharding.batch_sharding(physical), 16, process_index=0)
    mesh = sharding.make_mesh(-1, 1, 1, devices=devices)
    assert sharding.process_rows(sharding.batch_sharding(mesh), 16, process_index=0) == (0, 2)
    # inside each host the devices keep their physical (ring) order
    for p, block in enumerate(np.split(mesh.devices.reshape(-1), 2)):
        local = [d for d in devices if d.process_index == p]
        assert list(block) == list(mesh_utils.create_device_mesh((4, 1, 1), local).reshape(-1))
    # where physical order already keeps hosts together it is used as is; one host: always
    assert (sharding.make_mesh(2, 2, 2, devices=devices).devices
            == mesh_utils.create_device_mesh((2, 2, 2), devices)).all()
    one_host = _tpu("v5p:2x2x1")
    for sizes in ((-1, 1, 1), (1, 2, 2), (1, 1, 4)):
        assert (sharding.make_mesh(*sizes, devices=one_host).devices
                == mesh_utils.create_device_mesh(sharding.mesh_shape(*sizes, 4), one_host)).all()


@needs_libtpu
def test_shapes_the_topology_cannot_map_and_multislice_keep_hosts_together():
    # 3 hosts x 4 chips, batch 6 = 2x3: no per-host box, so hosts in order, devices by coords
    three = _tpu("v5p:2x2x3")
    for sizes in ((2, 3, 2), (2, 6, 1)):
        mesh = sharding.make_mesh(*sizes, devices=three)
        assert _host_blocks(mesh) == {0: (0, 3), 1: (1, 3), 2: (2, 3)}, sizes
    # two slices of 2 hosts: slices are the outer blocks of the batch, hosts inside them
    two = _tpu("v5p:2x2x2", slices=2)
    for sizes in ((2, 4, 2), (-1, 1, 1), (1, 16, 1), (1, 2, 8)):
        mesh = sharding.make_mesh(*sizes, devices=two)
        _host_blocks(mesh)
        slices_BT = np.vectorize(lambda d: d.slice_index)(mesh.devices).reshape(-1, sizes[2])
        half = len(slices_BT) // 2
        assert (slices_BT[:half] == 0).all() and (slices_BT[half:] == 1).all(), sizes


@needs_libtpu
def test_meshes_no_host_layout_can_serve_are_one_sentence():
    with pytest.raises(sharding.MeshError, match=re.escape(
            "config.mesh.tensor=6 neither divides nor is a multiple of the 4 devices per process, so "
            "no host can own whole batch rows; use tensor in [1, 2, 4] or a multiple of 4.")):
        sharding.make_mesh(1, 2, 6, devices=_tpu("v5p:2x2x3"))
    with pytest.raises(sharding.MeshError, match=re.escape(
            "config.mesh.tensor=16 would cross slices (slow network between slices of 8 devices); "
            "use a tensor size that divides 8.")):
        sharding.make_mesh(1, 1, 16, devices=_tpu("v5p:2x2x2", slices=2))
    with pytest.raises(sharding.MeshError, match=re.escape(
            "the mesh devices are spread unevenly over processes ([2, 4] per process); give every "
            "process the same number of devices.")):
        sharding.make_mesh(-1, 1, 1, devices=_tpu("v5p:2x2x2")[:6])


# ---- 8 fake devices: four meshes vs one device, shardings, restore onto other meshes ---------

MESHES = ("8x1x1", "2x4x1", "2x2x2", "1x1x8")


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("meshes")
    out = tmp / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), str(out), str(tmp)],
                          cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_one_step_on_every_mesh_matches_one_device(mesh_runs):
    ref = mesh_runs["reference"]
    assert ref["devices"] == 1
    for name in MESHES:
        r = mesh_runs[name]
        assert "x".join(str(v) for v in r["mesh"].values()) == name
        # fp32 sums in another order: losses agree to 1e-6 relative (measured <= 2e-7)
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-6, err_msg=name)
        assert r["init_diff"] == 0.0, name  # same init, also when created directly sharded
        # Adam's first step moves every weight by ~lr=3e-3 times sign(g); where a gradient is
        # ~0 its sign is float noise, so a few elements differ by up to a fraction of lr.
        # Measured: max 3.2e-5, at most 0.05% of elements above 1e-6. A broken shard would
        # move whole tensors by ~lr.
        assert max(r["param_diffs"]) < 1e-4, (name, r["param_diffs"])
        assert max(r["param_frac_over_1e-6"]) < 1e-3, (name, r["param_frac_over_1e-6"])
        assert r["opt_diff"] < 1e-6, (name, r["opt_diff"])  # Adam moments (measured <= 4.1e-8)


@pytest.mark.slow
def test_params_and_optimizer_state_are_sharded_by_the_rules(mesh_runs):
    def at(mesh, path, tree="params"):
        return mesh_runs[mesh][tree][path]

    q0, k0 = "['h_0']['attn']['q']['kernel']", "['h_0']['attn']['k']['kernel']"   # 8 self heads
    k1, k2 = "['h_1']['attn']['k']['kernel']", "['h_2']['attn']['k']['kernel']"   # 7 and 6
    gate, wte = "['h_0']['mlp']['gate']['kernel']", "['wte']"
    # pure data parallel: everything replicated
    assert {spec for spec, _ in mesh_runs["8x1x1"]["params"].values()} == {"replicated"}
    # tensor=8: q and even kv heads split 8 ways, 7 and 6 K/V heads replicated, vocab 259 replicated
    assert at("1x1x8", q0) == ["(-, tensor, -)", [64, 1, 8]]
    assert at("1x1x8", k0) == ["(-, tensor, -)", [64, 1, 8]]
    assert at("1x1x8", k1) == ["replicated", [64, 7, 8]]
    assert at("1x1x8", k2) == ["replicated", [64, 6, 8]]
    assert at("1x1x8", gate) == ["(-, tensor)", [64, 32]]
    assert at("1x1x8", wte) == ["replicated", [259, 64]]
    # fsdp=4: embed split 4 ways
    assert at("2x4x1", wte) == ["(-, fsdp)", [259, 16]]
    assert at("2x4x1", q0) == ["(fsdp, -, -)", [16, 8, 8]]
    # (2,2,2): 6 K/V heads split on tensor, 7 only on fsdp
    assert at("2x2x2", k2) == ["(fsdp, tensor, -)", [32, 3, 8]]
    assert at("2x2x2", k1) == ["(fsdp, -, -)", [32, 7, 8]]
    # Adam moments live exactly where their params live
    for mesh in MESHES:
        assert mesh_runs[mesh]["adam_mu"] == mesh_runs[mesh]["params"], mesh


@pytest.mark.slow
def test_batch_that_the_mesh_cannot_split_is_one_sentence(mesh_runs):
    assert mesh_runs["bad_batch_error"] == (
        "TrainingError: batch_size/grad_accum = 12 rows per micro-batch must be divisible by "
        "config.mesh data*fsdp = 8 (every batch shard takes an equal slice); change "
        "--config.batch_size or the mesh.")


@pytest.mark.slow
def test_checkpoint_saved_on_2x2x2_restores_onto_8x1x1_and_one_device(mesh_runs):
    for name, devices in (("restore 8x1x1", 8), ("restore 1 device", 1)):
        r = mesh_runs[name]
        assert r["param_diff"] == 0.0 and r["opt_diff"] == 0.0, name  # bitwise
        assert r["devices"] == [devices] and r["matches_target_shardings"], name
    assert {s for s, _ in mesh_runs["restore 8x1x1"]["params"].values()} == {"replicated"}
    assert mesh_runs["2x2x2"]["params"]["['wte']"][0] == "(-, fsdp)"


# ---- train.py: dry run and a real two-process run --------------------------------------------

MODEL_CLI = ["--config.model.n_layer=3", "--config.model.n_head=8", "--config.model.n_embd=32"]


def _cli(run_dir, **kw) -> list:
    opts = {"run_dir": run_dir, "data.task_rows": 400, "data.task_val_rows": 16,
            "data.loss_on": "all", "batch_size": 8, "eval_batches": 1, "log_interval": 1,
            "async_checkpoints": False, "optim.warmup_steps": 2}
    opts.update(kw)
    return MODEL_CLI + [f"--config.{k}={v}" for k, v in opts.items()]


def _train(args, devices, log_path, **env):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                             os.path.join(ROOT, "configs/tiny.py")] + args, cwd=ROOT,
                            env=_env(devices, **env), stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait(proc, log_path, timeout=600):
    proc.wait(timeout=timeout)
    out = open(log_path).read()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_dry_run_prints_mesh_memory_and_shardings_without_training(tmp_path):
    run = tmp_path / "dry"
    log = tmp_path / "dry.log"
    proc = _train(_cli(run, max_steps=5, **{"mesh.fsdp": 2, "mesh.tensor": 2,
                                            "model.block_size": 32, "eval_exact_match": 0})
                  + ["--dry_run"], 8, log)
    out = _wait(proc, log)
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 devices (1 process)" in out
    assert "batch 8 x 33 split (data+fsdp, -) (2 rows per batch shard, 8 per micro-batch x 1)" in out
    assert "per device: params " in out and "optimizer " in out
    assert "compiled step (per device): temporaries " in out
    lines = out.splitlines()
    q1 = next(line for line in lines if "['h_1']['attn']['q']['kernel']" in line)
    k1 = next(line for line in lines if "['h_1']['attn']['k']['kernel']" in line)
    assert q1.endswith("(fsdp, tensor, -)") and "(32, 8, 4)" in q1
    assert k1.endswith("(fsdp, -, -)") and "(32, 7, 4)" in k1  # 7 heads: no tensor
    n_params = len(jax.tree_util.tree_leaves(abstract_params(_tiny_model_cfg(block=32))))
    assert sum(line.startswith("  [") for line in lines) == n_params  # every parameter, once
    assert next(line for line in lines if "['wte']" in line).endswith("(-, fsdp)")  # vocab 259 odd
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def _tiny_model_cfg(block):
    from reflex_jax.run_config import load_config, model_config_from
    c = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 3, 8, 32, block
    return model_config_from(c)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _restore_on_one_device(run_dir, cfg, step):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                                      abstract_params(cfg))
    ck = ckpt.RunCheckpoints(str(run_dir), read_only=True)
    try:
        return jax.device_get(ck.restore_params(step, abstract))
    finally:
        ck.close()


@pytest.mark.slow
def test_two_processes_checkpoint_kill_resume_match_one_process(tmp_path):
    n, ckpt_every = 12, 3
    cfg = _tiny_model_cfg(block=96)
    # both runs start from the same converted-style params dir: every process reads it and keeps
    # only its shards (init_from on a multi-host mesh)
    from reflex_jax.model import init_params
    start = ckpt.save_params(str(tmp_path / "start"), cfg, init_params(cfg, jax.random.PRNGKey(3)),
                             {"tokenizer": "bytes"})
    run_kw = dict(max_steps=n, checkpoint_interval=ckpt_every, eval_interval=6, eval_exact_match=4,
                  init_from=start,
                  **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.block_size": 96})
    # the reference saves only where it evaluates (6, 12); saving never changes the numbers
    single = _train(_cli(tmp_path / "single", **dict(run_kw, checkpoint_interval=0)), 8,
                    tmp_path / "single.log")

    run = tmp_path / "multi"

    def launch(phase):
        port = _free_port()
        return [_train(_cli(run, **run_kw) + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                              f"--process_id={i}"], 4, tmp_path / f"{phase}{i}.log")
                for i in range(2)]

    procs = launch("first")
    deadline = time.time() + 600
    while not (run / "checkpoints" / str(ckpt_every)).exists() and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=60)
    first = [open(tmp_path / f"first{i}.log").read() for i in range(2)]
    assert all(p.returncode == -signal.SIGKILL for p in procs), "\n".join(f[-3000:] for f in first)
    saved = ckpt.RunCheckpoints(str(run), read_only=True).all_steps()
    assert saved and saved[-1] < n, f"the 2-process run finished before it was killed: {saved}"

    procs = launch("resumed")
    out0, out1 = (_wait(p, tmp_path / f"resumed{i}.log") for i, p in enumerate(procs))
    _wait(single, tmp_path / "single.log")

    # process 0 speaks and writes; process 1 only computes and checkpoints its shards
    assert f"resuming {run} from step {saved[-1]}" in out0 and "checkpoints:" in out0
    assert "resuming" not in out1 and "checkpoints:" not in out1
    for name in ("config.json", "model_config.json", "meta.json"):
        json.loads((run / name).read_text())

    multi, straight = _read_metrics(run), _read_metrics(tmp_path / "single")
    assert [r["step"] for r in multi] == list(range(1, n + 1))  # resumed rows replace killed ones
    # same global batches, same program; gloo vs in-process all-reduce may sum in another order
    np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in straight], rtol=1e-5)
    evals = [(r["step"], r["val_loss"], r["exact_match"]) for r in multi if "val_loss" in r]
    assert [e[0] for e in evals] == [6, 12]
    for (step, val, em), ref in zip(evals, [r for r in straight if "val_loss" in r]):
        np.testing.assert_allclose(val, ref["val_loss"], rtol=1e-5, err_msg=f"step {step}")
        assert em == ref["exact_match"], step  # greedy answers from params gathered off both hosts
    assert ckpt.RunCheckpoints(str(run), read_only=True).latest_step() == n

    assert f"initialised params from {start}" in open(tmp_path / "first0.log").read()
    p_multi = _restore_on_one_device(run, cfg, n)
    p_single = _restore_on_one_device(tmp_path / "single", cfg, n)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), p_multi, p_single)


@pytest.mark.slow
def test_two_processes_with_a_config_error_both_exit_with_one_sentence(tmp_path):
    port = _free_port()
    args = _cli(tmp_path / "bad", max_steps=2, eval_exact_match=0, batch_size=6,
                **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.block_size": 32})
    procs = [_train(args + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                            f"--process_id={i}"], 4, tmp_path / f"bad{i}.log") for i in range(2)]
    said, ended = [None, None], [None, None]  # when each printed its sentence, when it exited
    deadline = time.time() + 300
    while None in ended and time.time() < deadline:
        for i, p in enumerate(procs):
            if said[i] is None and "train.py: error:" in open(tmp_path / f"bad{i}.log").read():
                said[i] = time.time()
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.time()
        time.sleep(0.1)
    for p in procs:
        p.kill()
    logs = [open(tmp_path / f"bad{i}.log").read() for i in range(2)]
    assert None not in ended, "a process was still running after 300 s:\n" + logs[0][-2000:]
    want = ("train.py: error: batch_size/grad_accum = 6 rows per micro-batch must be divisible "
            "by config.mesh data*fsdp = 4 (every batch shard takes an equal slice); "
            "change --config.batch_size or the mesh.")
    for p, log in zip(procs, logs):
        # gloo's C++ threads write "[Gloo] Rank ..." lines into the same log, and one of theirs
        # can be cut short by ours: the sentence ends its line, whatever came before it
        assert p.returncode == 2 and any(line.endswith(want) for line in log.splitlines()), \
            log[-3000:]
    # nobody waits minutes in JAX's shutdown barrier: each leaves within the 30 s of the
    # user-error barrier after its sentence (a loaded machine may start one much later)
    assert all(e - (w or e) < 45 for w, e in zip(said, ended)), (said, ended)


def _launch_pair(run, run_kw, tmp_path, tag):
    port = _free_port()
    return [_train(_cli(run, **run_kw) + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                          f"--process_id={i}"], 1, tmp_path / f"{tag}{i}.log")
            for i in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("signalled", ["one host", "both hosts, a second apart"])
def test_sigterm_to_some_hosts_stops_every_host_at_one_step(tmp_path, signalled):
    """Two processes on loopback: SIGTERM to one of them (or to both at different steps) stops
    both at the same step (JAX's preemption sync point), one collective save, both exit 75; the
    resumed run's losses equal an uninterrupted run's bit for bit."""
    run_kw = {"max_steps": 300, "checkpoint_interval": 0, "eval_interval": 0,
              "eval_exact_match": 0, "mesh.data": 2, "model.block_size": 32}
    run = tmp_path / "run"
    procs = _launch_pair(run, run_kw, tmp_path, "first")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if (run / "metrics.jsonl").exists() and len(_read_metrics(run)) >= 5:
                break
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        if signalled != "one host":
            time.sleep(1.0)
            procs[0].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=120)  # no hang: both end
    finally:
        for p in procs:
            p.kill()
    logs = [open(tmp_path / f"first{i}.log").read() for i in range(2)]
    assert [p.returncode for p in procs] == [75, 75], "\n".join(x[-3000:] for x in logs)
    step = int(re.search(r"stopped by SIGTERM \(preemption, agreed by every host\) at step (\d+)",
                         logs[0]).group(1))
    assert ckpt.RunCheckpoints(str(run), read_only=True).latest_step() == step
    assert step < run_kw["max_steps"], "the run ended before the signal"
    for i, p in enumerate(_launch_pair(run, run_kw, tmp_path, "resumed")):
        _wait(p, tmp_path / f"resumed{i}.log")
    straight = tmp_path / "straight"
    for i, p in enumerate(_launch_pair(straight, run_kw, tmp_path, "straight")):
        _wait(p, tmp_path / f"straight{i}.log")
    assert [r["loss"] for r in _read_metrics(run)] == [r["loss"] for r in _read_metrics(straight)]


@pytest.mark.slow
def test_a_killed_host_ends_the_other_within_the_heartbeat_and_the_run_resumes(tmp_path):
    """SIGKILL to one of two processes: the other ends within seconds, long before the 60 s
    heartbeat (its peer watch reads the closed connection, or its next collective fails), with
    one sentence and exit 75, even where it was inside a save; the pair started again resumes
    from the last verified step (a save the kill cut before its checksums is set aside)."""
    run_kw = {"max_steps": 2000, "checkpoint_interval": 5, "eval_interval": 0,
              "eval_exact_match": 0, "mesh.data": 2, "model.block_size": 32}
    run = tmp_path / "run"
    port = _free_port()
    procs = [_train(_cli(run, **run_kw) + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                          f"--process_id={i}", "--heartbeat_s=60"], 1,
                    tmp_path / f"first{i}.log") for i in range(2)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if (run / "checkpoints" / "10").exists():
                break
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        procs[0].wait(timeout=120)
        ended = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    log0 = open(tmp_path / "first0.log").read()
    assert procs[0].returncode == 75 and ended < 10, (ended, log0[-3000:])
    assert re.search(r"train\.py: error: another process of this multi-host run is gone \(.+\); "
                     r"start every process again to resume .+ from its last committed step\.",
                     log0), log0[-3000:]
    assert "Traceback" not in log0 and "Check failure" not in log0, log0[-3000:]
    checkpoints = ckpt.RunCheckpoints(str(run), read_only=True)
    saved = max(s for s in checkpoints.all_steps() if checkpoints.verified(s))
    assert saved % 5 == 0
    for i, p in enumerate(_launch_pair(run, {**run_kw, "max_steps": saved + 2}, tmp_path, "again")):
        out = _wait(p, tmp_path / f"again{i}.log")
        if i == 0:
            assert f"resuming {run} from step {saved}" in out


_CLOCKED_TRAIN = """
import sys
import reflex_jax.train.loop as loop
rate = float(sys.argv[1])  # seconds that pass at each read of this process's fake clock
now = [0.0]
def clock():
    now[0] += rate
    return now[0]
real = loop.TrainLoop.__init__
loop.TrainLoop.__init__ = lambda self, *a, **kw: real(self, *a, **dict(kw, clock=clock))
sys.argv = ["train.py"] + sys.argv[2:]
from reflex_jax.cli.train import main
main()
"""


@pytest.mark.slow
def test_a_time_based_save_is_agreed_by_every_host(tmp_path):
    """checkpoint_minutes on two processes whose clocks disagree (fake clocks: process 0's gains
    20 s per read, process 1's 3 s, so process 1 alone would never save): process 0's clock
    decides for both, so both take part in the same collective saves, at steps 5 and 10 (one
    clock read at start, one per step, one per save; 1.5 minutes), then the final step 12."""
    script = tmp_path / "clocked_train.py"
    script.write_text(_CLOCKED_TRAIN)
    run = tmp_path / "run"
    run_kw = {"max_steps": 12, "checkpoint_interval": 100, "checkpoint_minutes": 1.5,
              "eval_interval": 0, "eval_exact_match": 0, "mesh.data": 2, "model.block_size": 32}
    port = _free_port()
    procs = []
    for i, rate in enumerate((20.0, 3.0)):
        log = open(tmp_path / f"p{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(rate), "--config", os.path.join(ROOT, "configs/tiny.py")]
            + _cli(run, **run_kw) + [f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                     f"--process_id={i}", "--heartbeat_s=10"],
            cwd=ROOT, env=_env(1), stdout=log, stderr=subprocess.STDOUT, text=True))
    try:
        for i, p in enumerate(procs):
            _wait(p, tmp_path / f"p{i}.log", timeout=300)
    finally:
        for p in procs:
            p.kill()
    assert ckpt.RunCheckpoints(str(run), read_only=True).all_steps() == [5, 10, 12]
