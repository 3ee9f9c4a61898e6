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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import MeshError, UsageError

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
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # odd shapes/topologies: fall back to the plain device order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


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


def process_rows(batch: NamedSharding, global_rows: int) -> tuple[int, int]:
    """(index, count): this process supplies block `index` of `count` equal row blocks.

    The rows a process must feed to `jax.make_array_from_process_local_data` are the rows its own
    devices hold. With the batch split over processes that is its 1/process_count slice, but when
    the batch axes live inside one host (e.g. mesh (1,1,8) over 2 hosts) every process holds, and
    must load, the whole batch. `BatchLoader(process_index=index, process_count=count)` gives
    exactly these rows.
    """
    held = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                   for s in batch.addressable_devices_indices_map((global_rows, 1)).values()})
    lo, hi = held[0][0], held[-1][1]
    covered = lo
    for a, b in held:  # the blocks must tile [lo, hi) without gaps
        if a > covered:
            break
        covered = max(covered, b)
    if covered != hi or global_rows % (hi - lo) or lo % (hi - lo):
        raise MeshError(f"this process's devices hold rows {held} of a {global_rows}-row batch, "
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
                                 auto: bool = False) -> bool:
    """Start multi-host JAX when asked (flags) or when the environment says so.

    Explicit: coordinator address + process count + index (e.g. two GPU nodes, or CPU processes on
    loopback). `auto` (train.py --multihost): `jax.distributed.initialize()` detects the cluster
    itself (Cloud TPU pod workers, SLURM, Open MPI, Kubernetes). Without flags, a SLURM job with
    several tasks or a GKE TPU slice with several hosts starts multi-host too. Must run before
    anything touches JAX devices. Returns whether JAX runs multi-process.
    """
    if auto and coordinator:
        raise UsageError("use either --multihost (auto-detected cluster) or --coordinator, not both.")
    if auto:
        _initialize({})
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
                         process_id=process_id, initialization_timeout=timeout_s))
        return True
    if num_processes > 1 or process_id >= 0:
        raise UsageError("--num_processes/--process_id need --coordinator host:port as well.")
    slurm_tasks = os.environ.get("SLURM_NTASKS", "1")
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if (slurm_tasks.isdigit() and int(slurm_tasks) > 1) or "," in tpu_hosts:
        _initialize({})
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
