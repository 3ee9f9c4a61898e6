"""Shared by the sampling and head-plan tests: cached decoding against one full forward pass."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from reflex_jax.model import Decoder
from reflex_jax.sampling import decode_step, prefill

FAST = {"xla_backend_optimization_level": 0}  # test-only compiles: half the compile time


def cached_and_full_logits(cfg, params, seqs, prompt_lens, n_decode: int, cache_len: int):
    """Row r's prompt seqs[r][:prompt_lens[r]] is left-padded and prefilled into a cache of
    `cache_len` slots, then seqs[r]'s next `n_decode` tokens are fed one at a time. Returns, per
    row, (the logits of positions 0..n+n_decode-1 that way, the same from one full forward pass
    over seqs[r]); prefill, decode and the reference share one compile."""
    P, T, B = max(prompt_lens), max(map(len, seqs)), len(seqs)
    prompts, full = np.zeros((B, P), np.int32), np.zeros((B, T), np.int32)
    for r, (n, s) in enumerate(zip(prompt_lens, seqs)):
        prompts[r, P - n:], full[r, :len(s)] = s[:n], s  # right padding: harmless when causal
    pad = np.array([P - n for n in prompt_lens], np.int32)
    fed = np.array([[s[n + j] for s, n in zip(seqs, prompt_lens)] for j in range(n_decode)],
                   np.int32)

    @functools.partial(jax.jit, compiler_options=FAST)
    def run(params):
        logits_pre, cache, key_mask = prefill(cfg, params, prompts, pad, cache_len, last_only=False)

        def step(cache, j):
            logits, cache = decode_step(cfg, params, cache, jnp.asarray(fed)[j], P + j,
                                        jnp.array(prompt_lens) + j, key_mask)
            return cache, logits
        _, logits_dec = jax.lax.scan(step, cache, jnp.arange(n_decode))
        return logits_pre, logits_dec, Decoder(cfg).apply({"params": params}, full)

    pre, dec, ref = map(np.asarray, run(params))
    return [(np.concatenate([pre[r, P - n:], dec[:, r]]), ref[r, :n + n_decode])
            for r, n in enumerate(prompt_lens)]
