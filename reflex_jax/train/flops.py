"""FLOPs per token (reflex-aware) and device peaks, for MFU.

Training FLOPs per token = 6 * N + 12 * L * H * D * T  (PaLM appendix B; nanoGPT's estimate):
* N counts the matmul parameters a token passes through: every layer's Q (all H heads), K/V (only
  the n_self self heads — this is where reflex saves), output projection and MLP, plus the output
  head (vocab x n_embd). Embedding lookups, norms and biases are not matmuls and are left out.
* 12 * L * H * D * T is attention's QK^T and AV, forward + backward, over the **full** T x T score
  matrix, which is what dense attention computes; the causal half would be 6 * L * H * D * T.
  Cross heads cost exactly what self heads cost, so this term is the same for every schedule.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from ..model import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    E, D, F = cfg.n_embd, cfg.head_dim, cfg.hidden
    n = cfg.vocab_size * E  # output head
    mlp = (3 if cfg.mlp == "swiglu" else 2) * E * F
    for plan in cfg.layers:
        n += E * plan.n_query * D               # Q (fewer: only the layer's own query heads)
        n += E * (plan.n_k + plan.n_v) * D      # K, V: the heads this layer computes
        n += plan.n_query * D * E               # output projection
        n += mlp
    return n


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Scores and weighted values, forward and backward, of every query head over the full T."""
    return 12 * sum(p.n_query for p in cfg.layers) * cfg.head_dim * seq_len


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return 6 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul on the default device (best of `repeats`)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def device_peak(dtype=jnp.float32) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from)."""
    from ..hardware import device_kind_chip  # the one table of chip figures
    device = jax.devices()[0]
    chip = device_kind_chip(device) if device.platform != "cpu" else None
    if chip is not None and jnp.dtype(dtype) == jnp.bfloat16:
        return chip.peak_bf16_flops, f"{chip.name} bf16 datasheet ({chip.source})"
    return measure_matmul_peak(dtype), f"measured {jnp.dtype(dtype).name} matmul on {device.device_kind}"
