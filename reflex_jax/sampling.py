"""Generation with a per-layer KV cache that holds only each layer's self heads (docs/attention.md).

Prompts are left-padded to a common length P, so every row's last prompt token sits at slot P-1
and new tokens go to the same slot for all rows. A key mask hides the padding and per-row
positions start at 0 at each row's first real token, so a row's result does not depend on its
batch-mates. Cross heads need nothing special: the decoder runs its layers in order, so a source
layer's cache already holds the current token when a later layer reads it.

The decode loop is one compiled `lax.while_loop`. Batch size, prompt length and cache length are
rounded up to buckets (powers of two, capped at block_size) and sampling settings are traced
values, so a `Generator` compiles once per bucket and sampling mode, not once per call.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .errors import GenerationError
from .kernels import DEFAULT, KernelChoices
from .model import Decoder, ModelConfig, head_matrix, init_cache, logits_from_hidden
from .model.kv import squeezed_cache_shape


# ---- the two model calls: prefill a left-padded prompt batch, then one token at a time ------------

def prefill(cfg: ModelConfig, params, tokens_BP, pad_B, cache_len: int, *, last_only: bool = True,
            kernels: KernelChoices = DEFAULT):
    """Run the prompts through a fresh cache of `cache_len` slots.

    `tokens_BP` is left-padded: row b's real tokens start at slot `pad_B[b]`. Returns
    (logits, cache, key_mask_BS): logits [B, V] of the last slot (or [B, P, V] for every slot when
    `last_only` is False) and the key mask the decode steps keep using (pad slots hidden).
    """
    B, P = tokens_BP.shape
    key_mask_BS = jnp.arange(cache_len)[None, :] >= pad_B[:, None]
    positions_BP = jnp.maximum(jnp.arange(P)[None, :] - pad_B[:, None], 0)
    h, cache = Decoder(cfg, kernels=kernels).apply(
        {"params": params}, tokens_BP, positions_BT=positions_BP,
        cache=init_cache(cfg, B, cache_len), cache_index=0, key_mask_BS=key_mask_BS,
        return_hidden=True)
    if last_only:
        h = h[:, -1:]  # only the last slot's logits are needed: skips a [B, P, vocab] matmul
    logits = logits_from_hidden(h, head_matrix(cfg, params))
    return (logits[:, 0] if last_only else logits), cache, key_mask_BS


def decode_step(cfg: ModelConfig, params, cache, tokens_B, slot, positions_B, key_mask_BS,
                kernels: KernelChoices = DEFAULT):
    """Feed one token per row at cache slot `slot` (row positions `positions_B`): ([B, V], cache)."""
    h, cache = Decoder(cfg, kernels=kernels).apply(
        {"params": params}, tokens_B[:, None], positions_BT=positions_B[:, None], cache=cache,
        cache_index=slot, key_mask_BS=key_mask_BS, return_hidden=True)
    return logits_from_hidden(h, head_matrix(cfg, params))[:, 0], cache


# ---- samplers ----------------------------------------------------------------------------------

def filter_logits(logits_BV, top_k, top_p):
    """Keep the top_k largest logits (0 = all), then the smallest prefix with mass >= top_p."""
    V = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_k = jnp.arange(V)[None, :] < k
    probs = jax.nn.softmax(jnp.where(in_k, sorted_BV, -jnp.inf), axis=-1)
    # A token stays if the mass strictly before it is < top_p (so the first one always stays).
    keep = in_k & ((jnp.cumsum(probs, axis=-1) - probs) < top_p)
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_BV, n_keep - 1, axis=-1)
    return jnp.where(logits_BV >= cutoff, logits_BV, -jnp.inf)


def sample_tokens(logits_BV, keys_B, temperature, top_k, top_p, *, greedy: bool, filtered: bool):
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / temperature
    if filtered:
        logits = filter_logits(logits, top_k, top_p)
    return jax.vmap(jax.random.categorical)(keys_B, logits).astype(jnp.int32)


# ---- buckets ------------------------------------------------------------------------------------

def bucket(n: int, cap: int, minimum: int = 8) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at `cap` but never below n."""
    if n > cap:
        return n
    return min(max(minimum, 1 << (n - 1).bit_length()), cap)


# ---- the generator ------------------------------------------------------------------------------

class Generator:
    """Cached generation for one ModelConfig; keep one instance to reuse its compiled loops.

    jit caches one executable per (batch bucket, prompt bucket, cache bucket, sampling mode);
    `compiles` counts how many were traced, `last_steps` is how many decode positions the last
    call ran (it stops early once every row has hit eos or a stop id). `compiler_options` go to XLA, e.g.
    {"xla_backend_optimization_level": 0} compiles about twice as fast and runs slower (tests).
    """

    def __init__(self, cfg: ModelConfig, compiler_options: Optional[dict] = None):
        self.cfg = cfg
        self.compiles = 0
        self.compiled_shapes: list[tuple[int, int, int]] = []  # (batch, prompt, cache) per trace
        self.last_steps = 0
        self._loop = jax.jit(self._loop_impl, static_argnames=("greedy", "filtered"),
                             compiler_options=compiler_options)

    def _loop_impl(self, params, tokens_BP, pad_B, active_B, out_BN, row0, max_new, temperature,
                   top_k, top_p, seed, stop_K, pad_id, *, greedy, filtered):
        self.compiles += 1  # runs only while tracing
        cfg = self.cfg
        B, P = tokens_BP.shape
        self.compiled_shapes.append((B, P, P + out_BN.shape[1]))
        # Row b of this chunk is row row0 + b of the request: its key does not depend on chunking.
        row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(
            row0 + jnp.arange(B))
        sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, greedy=greedy, filtered=filtered)

        def keys_at(step):  # a row's randomness depends on (seed, row index, step) only
            return jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)

        # The cache holds the prompt slots plus one slot per output token.
        logits, cache, key_mask = prefill(cfg, params, tokens_BP, pad_B, P + out_BN.shape[1])
        tok = jnp.where(active_B, sample(logits, keys_at(0)), pad_id)
        out_BN = out_BN.at[:, 0].set(tok)

        def stops(tok_B):  # stop_K is padded with -1, which no token equals
            return jnp.any(tok_B[:, None] == stop_K[None, :], axis=1)

        done = ~active_B | stops(tok)
        prompt_len_B = P - pad_B
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cache)

        def cond(state):
            n, _, _, done, _ = state
            return (n < max_new) & ~jnp.all(done)

        def body(state):
            n, carried, tok, done, out = state
            # Token n-1 goes to slot P+n-1 at row position prompt_len+n-1; its logits give token n.
            logits, cache = decode_step(cfg, params, _unsqueezed(carried, shapes), tok, P + n - 1,
                                        prompt_len_B + n - 1, key_mask)
            cache = _squeezed(cache)
            nxt = jnp.where(done, pad_id, sample(logits, keys_at(n)))
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (jnp.int32(0), n))
            return n + 1, cache, nxt, done | stops(nxt), out

        n, _, _, _, out_BN = jax.lax.while_loop(
            cond, body, (jnp.int32(1), _squeezed(cache), tok, done, out_BN))
        return out_BN, n

    def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_id: Optional[int] = None, pad_id: int = 0,
                 batch_size: Optional[int] = None, stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """New tokens per row, cut before the first eos or stop id. See the module docstring.

        `batch_size` bounds the rows run at once (memory grows with it; None: all at once). The
        rows go in chunks of that many, all compiled at one shape, with the same results as one
        batch: the prompt and cache buckets come from the whole request, and row r keeps its key.
        """
        cfg = self.cfg
        try:
            prompts = [[int(t) for t in p] for p in prompts]
        except (TypeError, ValueError):
            raise GenerationError("prompts must be lists of token ids; encode text with the "
                                  "model's tokenizer first.") from None
        _check_request(cfg, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id)
        stops = _stop_set(cfg, eos_id, stop_ids)
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise GenerationError(f"batch_size={batch_size!r} must be a positive integer (the most "
                                  "prompts generated at once).")
        self.last_steps = 0
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        n_rows = len(prompts)
        chunk = n_rows if batch_size is None else min(n_rows, int(batch_size))
        B = 1 << (chunk - 1).bit_length()  # the batch bucket: a power of two...
        if batch_size is not None:
            B = min(B, int(batch_size))      # ...but never above batch_size
        P = bucket(max(map(len, prompts)), cfg.block_size)
        S = bucket(P + max_new_tokens, cfg.block_size)
        settings = dict(max_new=np.int32(max_new_tokens),
                        temperature=np.float32(max(temperature, 1e-6)), top_k=np.int32(top_k),
                        top_p=np.float32(top_p), seed=np.uint32(seed % 2**32),
                        stop_K=_stop_array(stops), pad_id=np.int32(pad_id),
                        greedy=temperature == 0,
                        filtered=temperature > 0 and (top_k > 0 or top_p < 1.0))
        out = []
        for row0 in range(0, n_rows, chunk):
            out += self._run_chunk(params, prompts[row0:row0 + chunk], row0, B, P, S, settings)
        return [_cut_at(row, stops) for row in out]

    def _run_chunk(self, params, prompts, row0: int, B: int, P: int, S: int, settings: dict):
        """Rows row0.. of the request in one [B, P] batch (filler rows are done from the start)."""
        tokens = np.full((B, P), settings["pad_id"], np.int32)
        pad = np.full((B,), P - 1, np.int32)  # filler rows: one pad token
        for r, p in enumerate(prompts):
            tokens[r, P - len(p):] = p
            pad[r] = P - len(p)
        active = np.arange(B) < len(prompts)
        # Shapes carry the buckets (tokens [B, P], out [B, S-P]), so jit recompiles only for a new
        # bucket or sampling mode; every other argument is a traced scalar.
        out, n = self._loop(params, tokens, pad, active, np.zeros((B, S - P), np.int32),
                            np.int32(row0), **settings)
        self.last_steps = max(self.last_steps, int(n))
        return [row.tolist() for row in np.asarray(out)[:len(prompts), :int(n)]]


def _squeezed(cache):
    """The cache as the decode loop carries it: every array without its unit batch/head axes, so
    that XLA updates it in place (see model.kv.squeezed_cache_shape)."""
    return jax.tree.map(lambda a: a.reshape(squeezed_cache_shape(a.shape)), cache)


def _unsqueezed(carried, like):
    return jax.tree.map(lambda a, full: a.reshape(full.shape), carried, like)


def _cut_at(row: list[int], stops: frozenset) -> list[int]:
    """The row up to (without) its first stop token."""
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


def _stop_set(cfg: ModelConfig, eos_id: Optional[int], stop_ids: Sequence[int]) -> frozenset:
    try:
        ids = [int(t) for t in stop_ids]
    except (TypeError, ValueError):
        raise GenerationError(f"stop_ids={stop_ids!r} must be token ids (integers).") from None
    for t in ids:
        if not 0 <= t < cfg.vocab_size:
            raise GenerationError(f"stop id {t} is outside the model's vocab 0..{cfg.vocab_size - 1}; "
                                  "pass ids of the tokenizer the model was trained with.")
    return frozenset(ids + ([] if eos_id is None else [eos_id]))


def _stop_array(stops: frozenset) -> np.ndarray:
    """The stop ids padded with -1 (never a token) to a bucketed length, so a new count of stop
    ids seldom means a new compile."""
    n = bucket(max(len(stops), 1), 1 << 30, minimum=4)
    out = np.full((n,), -1, np.int32)
    out[:len(stops)] = sorted(stops)
    return out


def _check_request(cfg: ModelConfig, prompts, max_new_tokens, temperature, top_k, top_p, eos_id,
                   pad_id) -> None:
    V = cfg.vocab_size
    if not prompts:
        raise GenerationError("no prompts given; pass at least one prompt (a list of token ids).")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer.")
    if not np.isfinite(temperature) or temperature < 0:  # nan would pass `< 0` and sample token 0
        raise GenerationError(f"temperature={temperature} must be a finite number >= 0 (0 means "
                              "greedy).")
    if top_k < 0:
        raise GenerationError(f"top_k={top_k} must be >= 0 (0 turns top-k filtering off).")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p={top_p} must be in (0, 1] (1 turns nucleus filtering off).")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= value < V:
            raise GenerationError(f"{name}={value} is outside the model's vocab 0..{V - 1}; pass "
                                  "the special ids of the tokenizer the model was trained with.")
    for r, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {r} is empty; give at least one token (e.g. the "
                                  "tokenizer's bos).")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise GenerationError(f"prompt {r} has token id {bad[0]} outside the model's vocab "
                                  f"0..{V - 1}; encode it with the tokenizer the model was trained "
                                  "with.")
        if len(p) + max_new_tokens > cfg.block_size:
            raise GenerationError(
                f"prompt {r} has {len(p)} tokens and max_new_tokens={max_new_tokens}, together "
                f"{len(p) + max_new_tokens} > block_size={cfg.block_size}; shorten the prompt or "
                "lower max_new_tokens.")


_GENERATORS: dict[ModelConfig, Generator] = {}


def get_generator(cfg: ModelConfig) -> Generator:
    """The shared Generator of `cfg` (so plain `generate` calls reuse compiled loops too)."""
    if cfg not in _GENERATORS:
        _GENERATORS[cfg] = Generator(cfg)
    return _GENERATORS[cfg]


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: Optional[int] = None, pad_id: int = 0,
             batch_size: Optional[int] = None, stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """New tokens for every prompt (token-id lists), each cut before its first `eos_id` or any
    of `stop_ids` (a row stops generating there).

    temperature 0 is greedy; otherwise softmax(logits / temperature) filtered by top_k / top_p,
    with row r's draws keyed by (seed, r, step). Prompt plus max_new_tokens must fit in
    block_size (a GenerationError says so otherwise; nothing is truncated silently). At most
    `batch_size` rows run at once (None: all), with the same results.
    """
    return get_generator(cfg).generate(params, prompts, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=seed, eos_id=eos_id, pad_id=pad_id,
                                       batch_size=batch_size, stop_ids=stop_ids)
