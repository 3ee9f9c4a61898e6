"""The dry run: compile the run's functions from shapes alone and report what the compiler says.

It compiles the train step, the eval step, and sampling's two model calls (prefill over a whole
block, and one cached decode step) for the program's mesh (train/program.py), which may be made of
deviceless TPU or GPU devices (`train.py --dry_run --compile_for=v5p:2x2x2`). Every figure is the compiler's:
`memory_analysis()` per device and `cost_analysis()` per device; the roofline bound and the MFU it
allows follow from them and the chip's datasheet figures (reflex_jax/hardware.py). They are not
measured runs.
"""
from __future__ import annotations

import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding
from . import flops

FUNCTIONS = ("train_step", "eval_step", "prefill", "decode")


def per_device_bytes(tree) -> int:
    """Bytes of `tree`'s arrays that one device holds under their shardings."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(tree))


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _gib(n) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _lowerings(program) -> dict:
    """name -> (jitted function, abstract arguments), all sharded over the program's mesh."""
    from ..model import init_cache
    from ..sampling import decode_step, prefill
    c, cfg = program.config, program.model_config
    B, T = c.batch_size, program.seq_len
    rows = B // c.grad_accum  # eval and sampling run one micro-batch
    # rows split over the batch axes, whatever the rank (tokens [B, T], pads [B], caches [B, K, S, D])
    rows_split = jax.sharding.NamedSharding(program.mesh, jax.sharding.PartitionSpec(
        program.batch_sharding.spec[0]))
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows_split)  # noqa: E731
    params = program.abstract_model_params  # the model's (a LoRA run's: the merged base)
    out = {"train_step": (program.train_step, (program.abstract_state, program.abstract_batch(
               B, program.batch_keys, rows_split))),
           "eval_step": (program.eval_step, (params, program.abstract_batch(
               rows, program.eval_batch_keys, rows_split)))}
    kernels, replicated = program.kernels, program.replicated
    prefill_fn = program.with_rules(
        lambda p, tok, pad: prefill(cfg, p, tok, pad, T, kernels=kernels))
    out["prefill"] = (jax.jit(prefill_fn), (params, sds((rows, T), jnp.int32),
                                            sds((rows,), jnp.int32)))
    cache = jax.tree_util.tree_map(lambda x: sds(x.shape, x.dtype),
                                   jax.eval_shape(lambda: init_cache(cfg, rows, T)))
    decode_fn = program.with_rules(
        lambda p, cache, tok, slot, pos, mask: decode_step(cfg, p, cache, tok, slot, pos, mask,
                                                           kernels=kernels))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    out["decode"] = (jax.jit(decode_fn, donate_argnums=(1,)),
                     (params, cache, sds((rows,), jnp.int32), scalar, sds((rows,), jnp.int32),
                      sds((rows, T), jnp.bool_)))
    return out


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"temp": int(m.temp_size_in_bytes), "arguments": int(m.argument_size_in_bytes),
           "outputs": int(m.output_size_in_bytes), "aliased": int(m.alias_size_in_bytes),
           "code": int(m.generated_code_size_in_bytes)}
    # live at once: arguments + outputs not written in place of a donated argument + temporaries
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    return out


# XLA:TPU refuses to compile a program whose buffers exceed the chip's memory; it says, e.g.,
# "... the total memory required for HLO temporaries (52.03G) exceeds available HBM (15.75G)."
_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED: .*?required for ([\w ]+?) \(([\d.]+)([KMGT])\) "
                            r"exceeds available \w+ \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _compile(fn, args) -> dict:
    """One function's compile time, cost and memory; for a program the compiler refuses because
    it exceeds the device's memory, what the compiler said it needs (`out_of_memory`)."""
    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        m = _OUT_OF_MEMORY.search(str(e))
        if m is None:
            raise
        need = int(float(m.group(2)) * _UNITS[m.group(3)])
        return {"compile_s": time.perf_counter() - t0, "flops": 0.0, "bytes_accessed": 0.0,
                "memory": {}, "out_of_memory": {"what": m.group(1), "needs": need,
                                                "available": int(float(m.group(4)) *
                                                                 _UNITS[m.group(5)])}}
    return {"compile_s": time.perf_counter() - t0, **_cost(compiled), "memory": _memory(compiled)}


def compile_all(program, log=lambda s: None, names=FUNCTIONS, target=None) -> dict:
    """Compile the functions `names` (of FUNCTIONS); per function its memory, cost and compile
    time. `log` gets a line as each compile starts (a deep model's can take minutes) and as it
    ends; `target`: the hardware.Target the devices came from, which the start line names."""
    out = {}
    devices = list(program.mesh.devices.flat)
    where = (f"{getattr(target, 'name', None) or devices[0].platform} "
             f"({len(devices)} x {devices[0].device_kind})")
    for name, (fn, args) in _lowerings(program).items():
        if name not in names:
            continue
        log(f"compiling {name} for {where} ...")
        sys.stdout.flush()  # the line shows now, also when stdout is a pipe or a file
        out[name] = _compile(fn, args)
        oom = out[name].get("out_of_memory")
        log(f"compiled {name} in {out[name]['compile_s']:.1f} s" if oom is None else
            f"{name} does not fit: the compiler needs {_gib(oom['needs'])} for {oom['what']}, "
            f"the device has {_gib(oom['available'])}")
    return out


def report(program, target=None, log=lambda s: None, names=FUNCTIONS) -> dict:
    """The dry run of a TrainProgram as a JSON-able dict (see docs/training.md, "Dry run"); `names`
    picks the programs to compile (the train step always: the roofline is its)."""
    c, cfg, mesh = program.config, program.model_config, program.mesh
    chip = getattr(target, "chip", None)
    devices = list(mesh.devices.flat)
    functions = compile_all(program, log, names=("train_step", *names), target=target)
    step = functions["train_step"]
    state = program.abstract_state
    # params: everything the step holds; a LoRA run's frozen base and its adapters
    adapters = per_device_bytes(state.params) if program.lora is not None else None
    per_device = {"params": per_device_bytes(program.abstract_model_params) + (adapters or 0),
                  "lora_adapters": adapters,
                  "opt_state": per_device_bytes(state.opt_state),
                  **{k: step["memory"].get(k) for k in ("temp", "arguments", "outputs", "total")}}
    n = len(devices)
    tokens = c.batch_size * program.seq_len
    model_flops = flops.train_flops_per_token(cfg, program.seq_len) * tokens / n
    step_flops, step_bytes, source = step["flops"], step["bytes_accessed"], "compiler"
    if not step_flops and not step_bytes and step["memory"]:
        # a deviceless GPU compile reports no cost at all: the model's FLOPs, and a floor of
        # the bytes: every temporary written and read once, params, gradients and optimizer
        # state read and written once
        step_bytes = 2 * (step["memory"]["temp"] + 2 * per_device["params"]
                          + per_device["opt_state"])
        source = ("analytic (the compiler reports no cost for this target): the model's FLOPs; "
                  "bytes a floor, every temporary written and read once, params, gradients and "
                  "optimizer state read and written once")
    out = {"target": getattr(target, "name", None) or devices[0].platform,
           "device_kind": devices[0].device_kind, "n_devices": n,
           "n_hosts": len({d.process_index for d in devices}), "mesh": dict(mesh.shape),
           "schedule": cfg.schedule_table(), "per_device_bytes": per_device,
           "hbm_bytes": chip.hbm_bytes if chip else None,
           "flops_per_step": step_flops, "bytes_per_step": step_bytes, "cost_source": source,
           "model_flops_per_step": model_flops, "compile_s": sum(f["compile_s"] for f in
                                                                 functions.values()),
           "functions": functions}
    # a refused program needs at least what the compiler named plus the state it holds
    state_bytes = per_device["params"] + per_device["opt_state"]
    peak_total = max((f["memory"].get("total") or 0) if "out_of_memory" not in f else
                     f["out_of_memory"]["needs"] + state_bytes for f in functions.values())
    refused = any("out_of_memory" in f for f in functions.values())
    out["fits"] = False if refused else None if chip is None else peak_total <= chip.hbm_bytes
    out["peak_total_bytes"] = peak_total
    if chip is not None and not refused:
        # cost_analysis counts a loop body once (the grad-accumulation scan, the chunked loss)
        # and a Pallas (Mosaic) kernel only by the cost it declares (splash attention declares
        # none), so the model's own FLOP count is the floor of the work; the bytes are a floor too
        work = max(step_flops, model_flops)
        out["roofline_flops"] = work
        bound = max(work / chip.peak_bf16_flops, step_bytes / chip.hbm_bandwidth)
        out["roofline_step_s"] = bound
        out["roofline_mfu"] = model_flops / (bound * chip.peak_bf16_flops) if bound else None
        out["chip"] = {"name": chip.name, "peak_bf16_flops": chip.peak_bf16_flops,
                       "hbm_bandwidth": chip.hbm_bandwidth, "source": chip.source}
    return out


def format_report(program, rep: dict) -> str:
    """The dry run for people: mesh, batch, memory per device and per function, the verdict,
    the roofline bound, then every parameter's sharding."""
    c, cfg = program.config, program.model_config
    B, T = c.batch_size, program.seq_len
    hosts = rep["n_hosts"]
    pd = rep["per_device_bytes"]
    lines = [f"mesh {rep['mesh']} over {rep['n_devices']} devices "
             f"({hosts} process{'es' if hosts > 1 else ''}); {cfg.schedule_table()}",
             f"target {rep['target']} ({rep['device_kind']}); compiled in {rep['compile_s']:.1f} s",
             f"batch {B} x {T + 1} split {sharding.format_spec(program.batch_sharding.spec, 2)} "
             f"({B // sharding.batch_shards(program.mesh)} rows per batch shard, "
             f"{B // c.grad_accum} per micro-batch x {c.grad_accum}); "
             f"remat {program.remat}; compute {cfg.dtype}, params {cfg.param_dtype}",
             f"per device: params {_mib(pd['params'])}"
             + (f" (frozen base {_mib(pd['params'] - pd['lora_adapters'])} + LoRA adapters "
                f"{_mib(pd['lora_adapters'])})" if pd.get("lora_adapters") is not None else "")
             + f", optimizer {_mib(pd['opt_state'])}"]
    step = rep["functions"]["train_step"]["memory"]
    if step:
        lines.append(f"compiled step (per device): temporaries {_mib(step['temp'])} "
                     "(activations and workspace), "
                     f"arguments {_mib(step['arguments'])}, outputs {_mib(step['outputs'])}, "
                     f"total {_mib(step['total'])}")
    for name in FUNCTIONS[1:]:
        m = rep["functions"][name]["memory"]
        if m:
            lines.append(f"compiled {name} (per device): total {_mib(m['total'])} "
                         f"(temporaries {_mib(m['temp'])})")
    lines += _verdict_lines(rep)
    lines.append("parameter shardings:")
    shown = program.abstract_model_params
    if program.lora is not None:  # the frozen base, then the adapters the state trains
        shown = {"base": shown, "lora": program.abstract_state.params}
    for path, x in jax.tree_util.tree_leaves_with_path(shown):
        lines.append(f"  {jax.tree_util.keystr(path):45s} {str(x.shape):18s} "
                     f"{sharding.format_spec(x.sharding.spec, len(x.shape))}")
    return "\n".join(lines)


def _verdict_lines(rep: dict) -> list[str]:
    flops_s = (f"{rep['flops_per_step']:.4g} FLOPs and {rep['bytes_per_step']:.4g} bytes per step "
               "per device")
    if rep.get("cost_source", "compiler") != "compiler":
        flops_s += f" [{rep['cost_source']}]"
    need, have = rep["peak_total_bytes"], rep["hbm_bytes"]
    if rep["fits"] is None:
        return [f"compiler cost: {flops_s}"]
    if not rep["fits"]:
        refused = [n for n, f in rep["functions"].items() if "out_of_memory" in f]
        chip = f"the chip has {_gib(have)}" if have else "the device has less"
        return [f"does not fit: needs {'at least ' if refused else ''}{_gib(need)}, {chip}"
                + (f" (the compiler refused {', '.join(refused)})" if refused else "")]
    mfu = rep.get("roofline_mfu")
    return [f"fits: needs {_gib(need)} of the chip's {_gib(have)}",
            f"compiler cost: {flops_s}; roofline step >= {rep['roofline_step_s'] * 1e3:.1f} ms"
            + (f", which allows MFU <= {100 * mfu:.1f}%" if mfu else "")
            + " (compiler figures and datasheet peaks, not a measured run)"]
