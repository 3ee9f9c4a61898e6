"""The matmul peak that MFU is quoted against: large square matmuls in JAX and in PyTorch, timed
between the training steps so they see the same machine load."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from reflex_jax.train import flops

MATMULS_PER_CALL = 3  # one timed call runs this many matmuls (a single one is too short to time)


def jax_matmul(n: int, dtype: str) -> Callable[[], Any]:
    """n x n x n matmul accumulating in float32 (for bf16 the fast XLA:CPU path; a bf16-output
    dot runs as an f32 dot plus converts there, and the model never uses that form)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    return lambda: f(a, b).block_until_ready()


def torch_matmul(n: int, dtype: str) -> Callable[[], Any]:
    import torch
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
    a @ b
    return lambda: a @ b


def matmul_contenders(n: int, dtype: str, with_torch: bool) -> dict[str, Callable[[], Any]]:
    """{"jax": call, "torch": call}: each call runs MATMULS_PER_CALL matmuls."""
    mm = {"jax": jax_matmul(n, dtype)}
    if with_torch:
        mm["torch"] = torch_matmul(n, dtype)
    return {k: (lambda f=f: [f() for _ in range(MATMULS_PER_CALL)]) for k, f in mm.items()}


def peak_row(n: int, dtype: str, times: dict[str, list[float]]) -> dict:
    """The peak of `dtype` from the timed matmul calls ({"jax": [s, ...], "torch": [...]}), and
    on accelerators the datasheet peak of all devices."""
    flop = 2 * n ** 3 * MATMULS_PER_CALL
    # the peak is the best rep (a peak; and the conservative choice for MFU on a noisy box)
    rates = {k: flop / min(t) for k, t in times.items()}
    row = {"matmul_n": n, **{f"{k}_flops": v for k, v in rates.items()},
           "peak_flops": max(rates.values()), "source": max(rates, key=rates.get)}
    if jax.default_backend() != "cpu":  # accelerators: MFU is quoted against the datasheet
        value, where = flops.device_peak(jnp.dtype(dtype))
        if "datasheet" in where:
            row["datasheet_flops"] = value * jax.device_count()
    return row
