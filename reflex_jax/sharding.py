"""Device mesh, logical axis rules and multi-host start-up.

Every run is a mesh run over axes ('data', 'fsdp', 'tensor'); one device is the 1x1x1 case.
Parameters carry logical axis names (model/layers.py); RULES below is the one place that maps them onto
mesh axes. A dimension that a mesh axis does not divide is replicated instead: reflex layers have
uneven self-head counts (8, 7, 6, ...), so K/V head axes cannot assume divisibility.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import MeshError, ReflexError, UsageError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (tried in order; an axis is used only if it divides the dimension)
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "norm": (),
    "seq": (),
}


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """Resolve one -1 entry to "the rest of the devices" and check the product."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError("at most one of config.mesh.data/fsdp/tensor may be -1 (\"the rest\").")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"config.mesh sizes {tuple(sizes)} must be positive or -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise MeshError(f"config.mesh {tuple(sizes)}: {n_devices} devices do not divide by "
                            f"{known}; choose sizes whose product divides the device count.")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise MeshError(f"config.mesh data*fsdp*tensor = {int(np.prod(sizes))} but there are "
                        f"{n_devices} devices; make the product equal the device count (or use -1).")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """Mesh over axes ('data', 'fsdp', 'tensor') laid out for the hardware.

    One host: `create_device_mesh` order (the ICI ring/torus on TPU, ids on GPU, as given on CPU).
    Several hosts: every process must hold one contiguous block of batch rows (`process_rows`), which
    physical order often breaks (on v5p:2x2x2 the two hosts alternate along an 8-long batch axis).
    So the physical order is kept only when it already keeps each host's rows together and tensor
    inside a host; otherwise each host is one granule of `create_hybrid_device_mesh`: hosts in
    (slice, process) order tile data then fsdp (and tensor only where tensor outgrows a host), each
    host's devices in physical order inside its block. `jax.make_mesh` is not used: it makes the
    axes Explicit, which changes how jit propagates shardings.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    hosts: dict[tuple, list] = {}
    for d in sorted(devices, key=_device_order):
        hosts.setdefault(_host_of(d), []).append(d)
    if len(hosts) == 1:
        arr = _physical(shape, devices)
        return Mesh(_host_order(devices).reshape(shape) if arr is None else arr, MESH_AXES)
    return Mesh(_across_hosts(shape, hosts), MESH_AXES)


def _host_of(d) -> tuple:
    """(slice, process): slices meet over the slow data-centre network, hosts inside a slice."""
    return (getattr(d, "slice_index", 0) or 0, d.process_index)


def _device_order(d) -> tuple:
    """Host, then physical position z, y, x (the order of jax.devices() on TPU), then id."""
    return (_host_of(d), tuple(reversed(getattr(d, "coords", ()) or ())),
            getattr(d, "core_on_chip", 0) or 0, d.id)


def _host_order(devices) -> np.ndarray:
    """Fallback order for shapes the topology helpers cannot map: hosts one after another, each
    host's devices by physical position. Reshaped row-major into (data, fsdp, tensor), every host
    then owns a contiguous run of batch rows, and tensor stays inside a host whenever it divides the
    host's device count, whatever the topology."""
    return np.asarray(sorted(devices, key=_device_order))


def _physical(shape, devices) -> Optional[np.ndarray]:
    for split in (False, True):  # splitting a physical axis costs bandwidth: only if needed
        try:
            return mesh_utils.create_device_mesh(
                shape, devices=devices, allow_split_physical_axes=split)
        except (ValueError, AssertionError, NotImplementedError):
            pass
    return None


def _across_hosts(shape, hosts: dict) -> np.ndarray:
    tensor = shape[2]
    counts = sorted({len(h) for h in hosts.values()})
    if len(counts) > 1:
        raise MeshError(f"the mesh devices are spread unevenly over processes ({counts} per process); "
                        "give every process the same number of devices.")
    local, n_hosts = counts[0], len(hosts)
    if tensor % local and local % tensor:
        fits = [t for t in range(1, local + 1) if local % t == 0]
        raise MeshError(f"config.mesh.tensor={tensor} neither divides nor is a multiple of the "
                        f"{local} devices per process, so no host can own whole batch rows; use "
                        f"tensor in {fits} or a multiple of {local}.")
    per_slice = local * n_hosts // len({h[0] for h in hosts})
    if per_slice % tensor:
        raise MeshError(f"config.mesh.tensor={tensor} would cross slices (slow network between "
                        f"slices of {per_slice} devices); use a tensor size that divides {per_slice}.")
    devices = [d for h in hosts.values() for d in h]
    if len({h[0] for h in hosts}) == 1:
        arr = _physical(shape, devices)
        if arr is not None and _keeps_hosts_together(arr, local):
            return arr
    grid = _host_grid(shape, n_hosts, local)
    if grid is not None:
        for split in (False, True):
            try:
                return mesh_utils.create_hybrid_device_mesh(
                    grid[0], grid[1], devices, process_is_granule=True,
                    should_sort_granules_by_key=False, allow_split_physical_axes=split)
            except (ValueError, AssertionError, NotImplementedError):
                pass
    return _host_order(devices).reshape(shape)


def _host_grid(shape, n_hosts: int, local: int):
    """(per-host block, host grid) that tile `shape` with one host per block, hosts along data
    first, then fsdp, and along tensor only when tensor outgrows a host; None when a host's
    contiguous rows do not form a box of the mesh."""
    data, fsdp, tensor = shape
    t_local = min(tensor, local)
    on_tensor = tensor // t_local
    on_batch = n_hosts // on_tensor
    if data % on_batch == 0:
        return (data // on_batch, fsdp, t_local), (on_batch, 1, on_tensor)
    if on_batch % data == 0 and fsdp % (on_batch // data) == 0:
        return (1, fsdp * data // on_batch, t_local), (data, on_batch // data, on_tensor)
    return None


def _keeps_hosts_together(arr: np.ndarray, local: int) -> bool:
    """The rule `process_rows` enforces (each process's batch rows are one aligned block of an
    equal split), and a tensor group that fits in one host lies in one host."""
    procs_BT = np.vectorize(lambda d: d.process_index, otypes=[int])(arr).reshape(-1, arr.shape[-1])
    if local % arr.shape[-1] == 0 and (procs_BT != procs_BT[:, :1]).any():
        return False
    rows: dict[int, list[int]] = {}
    for b, procs in enumerate(procs_BT):
        for p in set(procs.tolist()):
            rows.setdefault(p, []).append(b)
    return all(r[-1] - r[0] + 1 == len(r) and r[0] % len(r) == 0 and len(procs_BT) % len(r) == 0
               for r in rows.values())


def spec_for(logical: Optional[P], shape: tuple, mesh: Mesh) -> P:
    """Mesh PartitionSpec for one array: logical names -> mesh axes, replicating where a mesh
    axis does not divide the dimension or is already used by another dimension."""
    if logical is None or len(logical) == 0:
        return P()
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = []
        size = 1
        for ax in RULES.get(name, ()) if name else ():
            n = mesh.shape[ax]
            if ax in used or n == 1 or dim % (size * n):
                continue
            axes.append(ax)
            size *= n
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def shardings_for(logical_tree, shapes_tree, mesh: Mesh):
    """NamedSharding tree for arrays with logical PartitionSpecs (`model.param_logical_axes`)."""
    return jax.tree_util.tree_map(
        lambda spec, s: NamedSharding(mesh, spec_for(spec, s.shape, mesh)),
        logical_tree, shapes_tree, is_leaf=lambda x: isinstance(x, P) or x is None)


def like_params(abstract_tree, abstract_params, param_shardings, mesh: Mesh):
    """Shardings for a tree (e.g. optimizer state) whose array leaves mirror params.

    A leaf takes the sharding of the param whose path is the longest suffix of the leaf's path
    and has the same shape (Adam's mu/nu); everything else (counts, scalars) is replicated.
    """
    by_path = {tuple(path): (sh, tuple(p.shape)) for (path, p), sh in
               zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                   jax.tree_util.tree_leaves(param_shardings))}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        for i in range(len(path)):
            hit = by_path.get(tuple(path[i:]))
            if hit is not None and hit[1] == tuple(getattr(leaf, "shape", ())):
                return hit[0]
        return replicated
    return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def format_spec(spec: P, ndim: int) -> str:
    """Human form of a PartitionSpec: one entry per dimension, `-` where it is not split, `a+b`
    where it is split over two mesh axes; `replicated` when nothing is split."""
    dims = list(spec) + [None] * (ndim - len(spec))
    if all(d is None for d in dims):
        return "replicated"
    return "(" + ", ".join("-" if d is None else d if isinstance(d, str) else "+".join(d)
                           for d in dims) + ")"


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """How many equal slices the batch dimension is cut into (product of its mesh axes)."""
    return int(np.prod([mesh.shape[a] for a in RULES["batch"]]))


def process_rows(batch: NamedSharding, global_rows: int,
                 process_index: Optional[int] = None) -> tuple[int, int]:
    """(index, count): this process supplies block `index` of `count` equal row blocks.

    The rows a process must feed to `jax.make_array_from_process_local_data` are the rows its own
    devices hold. With the batch split over processes that is its 1/process_count slice, but when
    the batch axes live inside one host (e.g. mesh (1,1,8) over 2 hosts) every process holds, and
    must load, the whole batch. `BatchLoader(process_index=index, process_count=count)` gives
    exactly these rows. `process_index` asks the same for another process (default: this one).
    """
    shape = (global_rows, 1)
    if process_index is None:
        where, who = batch.addressable_devices_indices_map(shape), "this process's"
    else:
        where = {d: i for d, i in batch.devices_indices_map(shape).items()
                 if d.process_index == process_index}
        who = f"process {process_index}'s"
    held = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                   for s in where.values()})
    lo, hi = held[0][0], held[-1][1]
    covered = lo
    for a, b in held:  # the blocks must tile [lo, hi) without gaps
        if a > covered:
            break
        covered = max(covered, b)
    if covered != hi or global_rows % (hi - lo) or lo % (hi - lo):
        raise MeshError(f"{who} devices hold rows {held} of a {global_rows}-row batch, "
                        "which is not one contiguous block; order the devices so each host's devices "
                        "are adjacent along config.mesh.data/fsdp.")
    return lo // (hi - lo), global_rows // (hi - lo)


def gather_to_host(tree, mesh: Mesh):
    """numpy copy of a tree of (possibly multi-host sharded) arrays, on every process.

    `jax.device_get` cannot read arrays with shards on other hosts; those are first replicated
    onto every device (one compiled identity for the whole tree), then read from a local shard.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    full = jax.jit(_identity, out_shardings=NamedSharding(mesh, P()))(tree)
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), full)


def _identity(x):
    return x


def logical_rules_for_flax(mesh: Mesh):
    """(logical, mesh axes) pairs for `nn.with_logical_constraint` inside jit."""
    return tuple((name, axes if axes else None) for name, axes in RULES.items())


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0,
                                 process_id: int = -1, timeout_s: int = 300,
                                 auto: bool = False, heartbeat_s: int = 100) -> bool:
    """Start multi-host JAX when asked (flags) or when the environment says so.

    Explicit: coordinator address + process count + index (e.g. two GPU nodes, or CPU processes on
    loopback). `auto` (train.py --multihost): `jax.distributed.initialize()` detects the cluster
    itself (Cloud TPU pod workers, SLURM, Open MPI, Kubernetes). Without flags, a SLURM job with
    several tasks or a GKE TPU slice with several hosts starts multi-host too. Must run before
    anything touches JAX devices. Returns whether JAX runs multi-process. `heartbeat_s`: a
    process silent that long (killed, its host gone) makes JAX end the others (JAX's default 100).
    """
    if heartbeat_s < 1:
        raise UsageError(f"--heartbeat_s={heartbeat_s} must be >= 1 (seconds).")
    hb = {"heartbeat_timeout_seconds": int(heartbeat_s)}
    if auto and coordinator:
        raise UsageError("use either --multihost (auto-detected cluster) or --coordinator, not both.")
    if auto:
        _initialize(dict(hb))
        return True
    if coordinator:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--coordinator={coordinator!r} must be host:port of process 0, "
                             "e.g. 10.0.0.1:1234.")
        if num_processes < 1 or process_id < 0:
            raise UsageError("--coordinator needs --num_processes and --process_id as well.")
        if process_id >= num_processes:
            raise UsageError(f"--process_id={process_id} must be below --num_processes={num_processes} "
                             "(processes are numbered 0..num_processes-1).")
        # CPU processes need a cross-process collectives backend; GPU/TPU ignore the setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _initialize(dict(coordinator_address=coordinator, num_processes=num_processes,
                         process_id=process_id, initialization_timeout=timeout_s, **hb))
        return True
    if num_processes > 1 or process_id >= 0:
        raise UsageError("--num_processes/--process_id need --coordinator host:port as well.")
    slurm_tasks = os.environ.get("SLURM_NTASKS", "1")
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if (slurm_tasks.isdigit() and int(slurm_tasks) > 1) or "," in tpu_hosts:
        _initialize(dict(hb))
        return True
    return False


def _initialize(kwargs: dict) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "before" in str(e) or "already" in str(e):
            raise UsageError("multi-host start-up must come before anything uses JAX devices; call "
                             "sharding.maybe_initialize_distributed first (train.py does).") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = kwargs.get("coordinator_address", "the auto-detected coordinator")
        raise UsageError(f"could not join the multi-host job at {where} ({first[:200]}); start every "
                         "process with the same --coordinator and --num_processes and a distinct "
                         "--process_id.") from e


# what a collective or the coordination service says when a peer process died (gloo on CPUs;
# the heartbeat and unhealthy-task errors of JAX's coordination service everywhere)
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Gloo", "heartbeat timeout",
              "tasks are unhealthy", "stopped sending heartbeats")


def lost_peer(error: BaseException) -> Optional[str]:
    """The first line of `error` when it says that another process of a multi-host job is gone
    (its collectives fail), else None."""
    if (jax.process_count() < 2 or isinstance(error, ReflexError)
            or not isinstance(error, (jax.errors.JaxRuntimeError, ValueError))):
        return None
    text = str(error).strip()
    if not any(p in text for p in _PEER_GONE):
        return None
    first = text.splitlines()[0]
    return first[:300]


def sync_processes(name: str) -> None:
    """Wait until every process of a multi-host job reaches this point (a no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
