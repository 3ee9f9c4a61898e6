"""Ends every process of a multi-host run at once when one of them dies.

JAX notices a dead process only when its heartbeat times out, and then aborts the others with a
page of coordination-service errors (exit 134). A process waiting in a coordination barrier (an
orbax save does) runs no collective that could fail first, so a killed peer meant that abort. Here
each process holds one TCP connection to process 0: a process killed or crashed closes it (its
kernel does), the other end reads EOF at once and calls `on_lost` (train.py: one sentence, exit
75). A process that leaves on purpose says goodbye first (`leave`), so the others carry on. A host
that vanishes without closing its connections is still ended by JAX's heartbeat.
"""
from __future__ import annotations

import socket
import sys
import threading
from typing import Callable, Optional

from .errors import TrainingError

_KEY = "reflex_jax/peer_watch"
_GOODBYE = b"."
_current: Optional["PeerWatch"] = None


class PeerWatch:
    def __init__(self, client, process_id: int, num_processes: int, coordinator_host: str,
                 on_lost: Callable[[str], None], timeout_s: int = 300):
        self._on_lost = on_lost
        self._left: set[int] = set()  # peers that said goodbye
        self._socks: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        if process_id == 0:
            server = (socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
                      if socket.has_dualstack_ipv6() else socket.create_server(("", 0)))
            client.key_value_set(_KEY, f"{coordinator_host}:{server.getsockname()[1]}")
            server.settimeout(timeout_s)
            try:
                for _ in range(num_processes - 1):  # every peer connects during start-up
                    conn, _ = server.accept()
                    conn.settimeout(None)
                    peer = int(_read_line(conn))
                    self._watch(peer, conn)
            except OSError as e:
                raise TrainingError(
                    f"only {len(self._socks)} of the {num_processes - 1} other processes connected "
                    f"to process 0's peer watch within {timeout_s} s ({e}); start every process "
                    "of the job, with the same --coordinator and --num_processes.") from None
            finally:
                server.close()
        else:
            try:
                addr = client.blocking_key_value_get(_KEY, timeout_s * 1000)
                host, _, port = addr.rpartition(":")
                conn = socket.create_connection((host, int(port)), timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - the coordination service's errors vary
                raise TrainingError(
                    f"process {process_id} could not reach process 0's peer watch "
                    f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); check "
                    "that process 0 runs and that its host accepts TCP connections from this "
                    "one.") from None
            conn.settimeout(None)
            conn.sendall(f"{process_id}\n".encode())
            self._watch(0, conn)

    def _watch(self, peer: int, conn: socket.socket) -> None:
        self._socks[peer] = conn
        threading.Thread(target=self._read, args=(peer, conn), daemon=True,
                         name=f"peer_watch-{peer}").start()

    def _read(self, peer: int, conn: socket.socket) -> None:
        try:
            while data := conn.recv(64):
                if _GOODBYE in data:
                    with self._lock:
                        self._left.add(peer)
        except OSError:
            pass
        with self._lock:
            if peer in self._left:
                return
        self._on_lost(f"process {peer} closed its connection without leaving")

    def leave(self) -> None:
        """Tell every peer this process leaves on purpose (the run finished, stopped or failed
        alike everywhere): their watch ignores the connection closing."""
        with self._lock:
            self._left.update(self._socks)  # our own end closing is not a peer lost
        for conn in self._socks.values():
            try:
                conn.sendall(_GOODBYE)
            except OSError:
                pass


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(16)
        if not chunk:
            raise ConnectionError("a peer closed its connection during start-up")
        data += chunk
    return data.decode().strip()


def start(on_lost: Callable[[str], None], timeout_s: int = 300) -> Optional[PeerWatch]:
    """Watch the other processes of this multi-host job (None on one process). Call after
    jax.distributed.initialize, on every process (process 0 waits for the others to connect)."""
    global _current
    import jax
    if jax.process_count() < 2:
        return None
    try:  # JAX exposes no public handle on its coordination client
        from jax._src.distributed import global_state
        client, address = global_state.client, global_state.coordinator_address
        client.key_value_set, client.blocking_key_value_get  # noqa: B018 - both are used
    except (ImportError, AttributeError):
        print("peer_watch: this JAX release moved its coordination client, so a dead process "
              "ends the others only through JAX's heartbeat (--heartbeat_s).", file=sys.stderr)
        return None
    host = address.rpartition(":")[0].strip("[]")
    _current = PeerWatch(client, jax.process_index(), jax.process_count(), host, on_lost, timeout_s)
    return _current


def leave() -> None:
    """`PeerWatch.leave` on the watch `start` made, if any."""
    if _current is not None:
        _current.leave()
