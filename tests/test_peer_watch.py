"""peer_watch on real two-process JAX over loopback: a killed peer is known at once even where
the survivor waits in a coordination barrier (an orbax save's), long before JAX's heartbeat
would abort it; a peer that leaves on purpose ends nobody."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = """
import os, sys, time
import jax
from jax._src.distributed import global_state
from reflex_jax import peer_watch
pid, port, role = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout_seconds=30)
def lost(cause):
    print("LOST", cause, flush=True)
    os._exit(75)
if role == "nowatch":  # joins the job (its devices too), never the watch
    jax.devices()
    time.sleep(60)
try:
    peer_watch.start(lost, timeout_s=int(sys.argv[4]) if len(sys.argv) > 4 else 300)
except Exception as e:
    print("ERROR", type(e).__name__, e, flush=True)
    os._exit(3)
print("watching", flush=True)
if role == "wait":  # in a barrier the dead peer never reaches: no collective fails first
    try:
        global_state.client.wait_at_barrier("never", 120_000)
    except Exception as e:
        print("barrier failed", str(e)[:200], flush=True)
elif role == "leave":
    peer_watch.leave()
    os._exit(0)
elif role == "outlive":  # stay after the peer left
    time.sleep(6)
    print("still here", flush=True)
    os._exit(0)
else:
    time.sleep(300)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, roles, extra=()):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return [subprocess.Popen([sys.executable, str(script), str(i), port, role, *extra], cwd=ROOT,
                             env=env, stdout=open(tmp_path / f"p{i}.log", "w"),
                             stderr=subprocess.STDOUT)
            for i, role in enumerate(roles)]


def _pair(tmp_path, roles):
    procs = _start(tmp_path, roles)
    deadline = time.time() + 120
    while not all("watching" in (tmp_path / f"p{i}.log").read_text() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [(tmp_path / f"p{i}.log").read_text()[-2000:] for i in range(2)]
        time.sleep(0.1)
    return procs


def _end(procs):
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_process_is_known_at_once_where_the_other_waits_in_a_barrier(tmp_path, killed):
    """The survivor sits in a coordination barrier (heartbeat 30 s): killing its peer, either
    the one that hosts the coordination service or not, ends it through on_lost in seconds."""
    survivor = 1 - killed
    procs = _pair(tmp_path, ["wait" if i == survivor else "sleep" for i in range(2)])
    try:
        time.sleep(1)  # the survivor is in the barrier
        procs[killed].send_signal(signal.SIGKILL)
        t0 = time.time()
        procs[survivor].wait(timeout=60)
        ended = time.time() - t0
    finally:
        _end(procs)
    log = (tmp_path / f"p{survivor}.log").read_text()
    assert procs[survivor].returncode == 75 and ended < 10, (ended, log[-3000:])
    assert f"LOST process {killed} closed its connection without leaving" in log, log[-3000:]


@pytest.mark.slow
def test_a_process_that_leaves_on_purpose_ends_nobody(tmp_path):
    procs = _pair(tmp_path, ["outlive", "leave"])
    try:
        procs[0].wait(timeout=60)
    finally:
        _end(procs)
    log = (tmp_path / "p0.log").read_text()
    assert procs[0].returncode == 0 and "still here" in log and "LOST" not in log, log[-3000:]


@pytest.mark.slow
def test_a_peer_that_never_connects_is_one_sentence_not_a_hang(tmp_path):
    procs = _start(tmp_path, ["wait", "nowatch"], extra=("3",))
    try:
        procs[0].wait(timeout=90)
    finally:
        _end(procs)
    log = (tmp_path / "p0.log").read_text()
    assert procs[0].returncode == 3, log[-3000:]
    assert ("ERROR TrainingError only 0 of the 1 other processes connected to process 0's peer "
            "watch within 3 s") in log and "start every process of the job" in log, log[-3000:]
