"""The machine a measurement ran on: CPU model and flags, usable cores, software versions."""
from __future__ import annotations

import datetime
import os
import platform

import jax

from reflex_jax import malloc_tuning


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpuinfo_field(name: str):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value
    except OSError:
        pass
    return None


def cpu_model() -> str:
    value = _cpuinfo_field("model name")
    return value.strip() if value is not None else (platform.processor() or "unknown CPU")


def cpu_generation() -> str:
    """'family 26, model 2, stepping 1' from /proc/cpuinfo ('' where it does not say): VMs of
    different CPU generations report the same model name (e.g. "AMD EPYC")."""
    parts = [("family", _cpuinfo_field("cpu family")), ("model", _cpuinfo_field("model")),
             ("stepping", _cpuinfo_field("stepping"))]
    return ", ".join(f"{k} {v.strip()}" for k, v in parts if v is not None)


def cpu_flags() -> set:
    value = _cpuinfo_field("flags")
    return set(value.split()) if value is not None else set()


def default_dtypes() -> tuple[str, ...]:
    """bfloat16 first where the CPU has bf16 dot instructions (the fast path), then float32."""
    if jax.default_backend() != "cpu" or {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return ("bfloat16", "float32")
    return ("float32",)


def environment() -> dict:
    """Date, CPU, load, versions and the settings every contender shares (XLA flags, malloc)."""
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cpu_generation": cpu_generation(), "cores": cpu_count(),
           "load_avg_start": os.getloadavg()[0],
           "jax": jax.__version__, "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "avx512_bf16": "avx512_bf16" in cpu_flags(),
           "amx_bf16": "amx_bf16" in cpu_flags(),
           # the instruction sets the matmul libraries choose kernels by
           "cpu_flags": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16",
                                              "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8",
                                              "amx_fp16"}),
           # malloc settings (reflex_jax/malloc_tuning.py): the same for every contender
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "thp": malloc_tuning.thp_mode()}
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return env
