"""LoRA fine-tuning: low-rank adapters on a frozen base, as a params transform.

A run with `lora.rank` > 0 trains, for every targeted kernel W of the base (`init_from`), two
matrices A [*in, r] and B [r, *out] (B starts at 0, A uniform in ±1/sqrt(fan_in), as PEFT's LoRA)
and computes the model with W + (alpha / r) · A @ B: the step merges the adapters into the base
params (`merge`) before `Decoder.apply`, so every kernel, head plan and the PyTorch export run
unchanged, and only the adapters (and their optimizer state) are trained and saved. The base is
stored once, by reference: `<run_dir>/lora.json` names its directory (and step, for a run), with
a fingerprint of its values that a resume and `checkpoint.load_params` check.

Each Reflex layer has its own head split, so a layer's adapters take that layer's shapes: q
[E, n_q, D] gets A [E, r] and B [r, n_q, D], k/v [E, n_kv, D] likewise (a layer that borrows all
its K/V has none), o [n_q, D, E] gets A [n_q, D, r] and B [r, E], the MLP's matrices A [in, r] and
B [r, out].
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import storage
from ..errors import CheckpointError, ConfigError, TrainingError

LORA_FILE = "lora.json"
# the spelling of lora.targets -> the modules it adapts (their kernels)
TARGETS = {"q": (("attn", "q"),), "k": (("attn", "k"),), "v": (("attn", "v"),),
           "kv": (("attn", "k"), ("attn", "v")), "o": (("attn", "o"),),
           "mlp": tuple(("mlp", n) for n in ("fc", "proj", "gate", "up", "down"))}
# how many leading axes of each kernel are its input (the rest, its output)
IN_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "fc": 1, "proj": 1, "gate": 1, "up": 1, "down": 1}
A, B = "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple  # the (parent, module) pairs adapted, e.g. (("attn", "q"), ("mlp", "up"))
    spelling: str   # lora.targets as given, normalised ("q,kv,o,mlp")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": self.spelling}


def spec_from_config(config) -> Optional[LoraSpec]:
    """The run's LoraSpec (None when `lora.rank` is 0), every field checked in one sentence."""
    section = config.get("lora")
    if section is None:
        return None
    return make_spec(section.rank, section.alpha, section.targets,
                     init_from=config.get("init_from", ""))


def make_spec(rank, alpha, targets, init_from: Optional[str] = "base") -> Optional[LoraSpec]:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ConfigError(f"lora.rank={rank!r} must be an integer >= 0 (0 turns LoRA off), e.g. "
                          "--config.lora.rank=8.")
    if rank == 0:
        return None
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"lora.alpha={alpha!r} must be a positive number (the adapters are "
                          "scaled by alpha/rank), e.g. --config.lora.alpha=16.")
    words = [w.strip() for w in str(targets).split(",") if w.strip()]
    bad = [w for w in words if w not in TARGETS]
    if bad or not words:
        raise ConfigError(f"lora.targets={targets!r} must be a comma-separated subset of "
                          f"{', '.join(TARGETS)} (kv = k and v), e.g. --config.lora.targets=q,kv,o,mlp.")
    if not init_from:
        raise ConfigError(f"lora.rank={rank} trains adapters on a frozen base; set "
                          "--config.init_from to a convert_weights.py output or a run directory.")
    modules = []
    for w in words:
        modules += [m for m in TARGETS[w] if m not in modules]
    return LoraSpec(rank, float(alpha), tuple(modules), ",".join(dict.fromkeys(words)))


# ---- the adapters ------------------------------------------------------------------------------

def _target(path, spec: LoraSpec) -> Optional[str]:
    """The module name of a targeted kernel's path (None: not adapted)."""
    keys = tuple(getattr(k, "key", None) for k in path)
    if len(keys) >= 3 and keys[-1] == "kernel" and keys[-3:-1] in spec.targets:
        return keys[-2]
    return None


def _kernels(params, spec: LoraSpec) -> dict:
    """{path tuple: (module name, kernel)} of the targeted kernels of a params tree."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = _target(path, spec)
        if name is not None:
            out[tuple(k.key for k in path[:-1])] = (name, x)
    return out


def _split(name: str, shape: tuple) -> tuple[int, int]:
    """(leading batch axes, input axes) of a kernel: q/k/v end in two output axes (heads,
    head_dim), the others in one; axes before the input ones (a stacked kernel's) are batch."""
    n_in, n_out = IN_AXES[name], 2 if name in ("q", "k", "v") else 1
    return len(shape) - n_in - n_out, n_in


def adapter_shapes(params, spec: LoraSpec) -> dict:
    """{module path: (batch axes, fan_in, {lora_a: shape, lora_b: shape})} for the targeted
    kernels of `params`."""
    out = {}
    for path, (name, w) in _kernels(params, spec).items():
        shape = tuple(w.shape)
        nb, n_in = _split(name, shape)
        out[path] = (nb, math.prod(shape[nb:nb + n_in]),
                     {A: shape[:nb + n_in] + (spec.rank,),
                      B: shape[:nb] + (spec.rank,) + shape[nb + n_in:]})
    return out


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def _flat(tree, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and set(v) != {A, B}:
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def abstract_adapters(cfg, spec: LoraSpec, dtype=None) -> dict:
    """ShapeDtypeStructs of the adapters of `cfg`'s model (param dtype)."""
    from ..model import abstract_params
    params = abstract_params(cfg)
    dtype = dtype or cfg.params_dtype
    return _nest({p: {k: jax.ShapeDtypeStruct(s, dtype) for k, s in ab.items()}
                  for p, (_, _, ab) in adapter_shapes(params, spec).items()})


def adapter_logical_axes(cfg, spec: LoraSpec) -> dict:
    """Logical PartitionSpecs of the adapters: A keeps the kernel's input axes, B its output ones
    (the rank axis is never split)."""
    from jax.sharding import PartitionSpec as P

    from ..model import abstract_params, param_logical_axes
    params, axes = abstract_params(cfg), param_logical_axes(cfg)
    kernel_axes = {tuple(k.key for k in path[:-1]): tuple(a) for path, a in
                   jax.tree_util.tree_leaves_with_path(
                       axes, is_leaf=lambda x: isinstance(x, P))}
    out = {}
    for path, (name, w) in _kernels(params, spec).items():
        nb, n_in = _split(name, tuple(w.shape))
        a = kernel_axes[path] + (None,) * (len(w.shape) - len(kernel_axes[path]))
        out[path] = {A: P(*a[:nb + n_in], None), B: P(*a[:nb], None, *a[nb + n_in:])}
    return _nest(out)


def init_adapters(cfg, spec: LoraSpec, rng) -> dict:
    """A uniform in ±1/sqrt(fan_in) (PEFT's kaiming-uniform with a = sqrt(5)), B zeros."""
    from ..model import abstract_params
    out = {}
    shapes = adapter_shapes(abstract_params(cfg), spec)
    for i, (path, (_, fan_in, ab)) in enumerate(sorted(shapes.items())):
        bound = 1.0 / math.sqrt(fan_in)
        out[path] = {A: jax.random.uniform(jax.random.fold_in(rng, i), ab[A], cfg.params_dtype,
                                           -bound, bound),
                     B: jnp.zeros(ab[B], cfg.params_dtype)}
    return _nest(out)


def delta(a, b, nb: int):
    """A @ B over the rank axis, in float32: [*batch, *in, r] x [*batch, r, *out] ->
    [*batch, *in, *out]."""
    batch, a_in, b_out = a.shape[:nb], a.shape[nb:-1], b.shape[nb + 1:]
    a2 = a.reshape(batch + (math.prod(a_in), a.shape[-1])).astype(jnp.float32)
    b2 = b.reshape(batch + (b.shape[nb], math.prod(b_out))).astype(jnp.float32)
    return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(batch + a_in + b_out)


def merge(base, adapters, spec: LoraSpec):
    """`base` with every adapted kernel W replaced by W + (alpha/r) · A @ B (in W's dtype; the
    sum in float32). Exactly `base`'s values while B is zero."""
    flat = _flat(adapters)

    def one(path, w):
        name = _target(path, spec)
        if name is None:
            return w
        ab = flat.get(tuple(k.key for k in path[:-1]))
        if ab is None:
            return w
        nb, _ = _split(name, tuple(w.shape))
        d = delta(ab[A], ab[B], nb)
        return (w.astype(jnp.float32) + spec.scale * d).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(one, base)


def check_adapters_fit(cfg, spec: LoraSpec, adapters, where: str) -> None:
    """One sentence if `adapters` are not those of `cfg` and `spec`."""
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
            jax.tree_util.tree_leaves_with_path(abstract_adapters(cfg, spec))}
    have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
            jax.tree_util.tree_leaves_with_path(adapters)}
    if want != have:
        name = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise CheckpointError(f"checkpoint {where!r} does not hold the LoRA adapters of "
                              f"{LORA_FILE} (first difference: {name[0]}); restore the run's "
                              f"{LORA_FILE} or its checkpoints.")


# ---- the base's fingerprint --------------------------------------------------------------------

@jax.jit
def _sums(leaves):
    """Per leaf, two wrapping uint32 sums of its bits (plain and position-weighted): exact and
    independent of the order and sharding of the reduction."""
    out = []
    for x in leaves:
        x = jnp.asarray(x)
        size = x.dtype.itemsize
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size])
        bits = bits.astype(jnp.uint32).reshape(-1)
        idx = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        out.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                              jnp.sum(bits * idx, dtype=jnp.uint32)]))
    return out


def fingerprint(params) -> str:
    """16 hex digits that change when any value, shape, dtype or name of `params` does."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    sums = jax.device_get(_sums([x for _, x in leaves]))
    h = hashlib.sha256()
    for (path, x), s in zip(leaves, sums):
        h.update(json.dumps([jax.tree_util.keystr(path), list(x.shape), str(x.dtype),
                             [int(v) for v in np.asarray(s)]]).encode())
    return h.hexdigest()[:16]


# ---- the reference in the run directory --------------------------------------------------------

def read_reference(run_dir: str) -> Optional[dict]:
    path = storage.join(run_dir, LORA_FILE)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def write_reference(run_dir: str, spec: LoraSpec, base: str, base_step: Optional[int],
                    base_fingerprint: str) -> None:
    from ..checkpoint import write_json
    write_json(storage.join(run_dir, LORA_FILE),
               {**spec.to_dict(), "base": base, "base_step": base_step,
                "base_fingerprint": base_fingerprint})


def spec_of_reference(ref: dict) -> LoraSpec:
    return make_spec(int(ref["rank"]), float(ref["alpha"]), ref["targets"])


def resolve_base(path: str) -> str:
    import os
    return storage.resolve(path) if storage.is_remote(path) else os.path.abspath(path)


def base_step_of(path: str) -> Optional[int]:
    """The step a run-directory base is pinned to (its best step now); None for a params
    directory."""
    from .. import checkpoint as ckpt
    if storage.isdir(storage.join(path, ckpt.PARAMS)) or not storage.isdir(
            storage.join(path, ckpt.CHECKPOINTS)):
        return None
    run = ckpt.RunCheckpoints(path, read_only=True)
    try:
        return run.pick_step()
    finally:
        run.close()


def check_resume(config, spec: Optional[LoraSpec], resuming: bool) -> Optional[dict]:
    """A resumed run keeps its LoRA settings: one sentence if the config's differ from the run's
    (or a full run is resumed as LoRA, or the reverse). Returns the run's reference."""
    ref = read_reference(config.run_dir)
    if not resuming:
        return ref
    if ref is None and spec is not None:
        raise TrainingError(f"run_dir {config.run_dir!r} holds checkpoints of a full run, not "
                            f"LoRA adapters; use a new --config.run_dir for lora.rank={spec.rank}.")
    if ref is not None:
        was = spec_of_reference(ref)
        if spec is None or spec.to_dict() != was.to_dict():
            now = "lora.rank=0" if spec is None else (
                f"rank={spec.rank}, alpha={spec.alpha:g}, targets={spec.spelling}")
            raise TrainingError(
                f"run_dir {config.run_dir!r} holds LoRA adapters of rank={was.rank}, "
                f"alpha={was.alpha:g}, targets={was.spelling} but the config asks for {now}; "
                f"resume with --config.lora.rank={was.rank} --config.lora.alpha={was.alpha:g} "
                f"--config.lora.targets={was.spelling} or use a new --config.run_dir.")
    return ref


def load_base(config, cfg, abstract_params, ref: Optional[dict], resuming: bool):
    """(params, path, step): the frozen base of a LoRA run from `init_from`, with the step of a
    run-directory base pinned by the run's reference when it has one."""
    from .restore import load_init_params
    path = resolve_base(config.init_from)
    if resuming and not storage.isdir(path):
        raise TrainingError(f"the LoRA base {path!r} that run_dir {config.run_dir!r} was trained on "
                            "does not exist; restore it there or set --config.init_from to a copy.")
    step = ref.get("base_step") if ref is not None and resuming else None
    if step is None:
        step = base_step_of(path) if storage.isdir(path) else None
    params = load_init_params(path, cfg, abstract_params, step=step)
    return params, path, step


def check_fingerprint(config, ref: Optional[dict], resuming: bool, path: str,
                      now: str) -> None:
    if not resuming or ref is None or ref.get("base_fingerprint") in (None, now):
        return
    raise TrainingError(f"the LoRA base {path!r} has changed since run_dir {config.run_dir!r} "
                        f"was trained on it (fingerprint {ref['base_fingerprint']} -> {now}); "
                        "restore the base it was trained on or use a new --config.run_dir.")


def merged_run_params(cfg, run_dir: str, adapters, ref: dict, where: str):
    """The params of a LoRA run's checkpoint: its base (the reference) with `adapters` merged."""
    from .. import checkpoint as ckpt
    spec = spec_of_reference(ref)
    check_adapters_fit(cfg, spec, adapters, where)
    base = ref["base"]
    if not storage.isdir(base):
        raise CheckpointError(f"the LoRA base {base!r} of {run_dir!r} does not exist; restore it "
                              f"there (or edit 'base' in {storage.join(run_dir, LORA_FILE)}).")
    base_cfg, params = ckpt.load_params(base, step=ref.get("base_step"))
    ckpt.check_params_fit(cfg, params, base)
    now = fingerprint(params)
    if ref.get("base_fingerprint") not in (None, now):
        raise CheckpointError(f"the LoRA base {base!r} of {run_dir!r} has changed since the "
                              f"adapters were trained on it (fingerprint "
                              f"{ref['base_fingerprint']} -> {now}); restore the base they were "
                              "trained on.")
    return jax.jit(lambda p, a: merge(p, a, spec))(params, adapters)
