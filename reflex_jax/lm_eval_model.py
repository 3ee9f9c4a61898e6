"""lm-evaluation-harness on the JAX decoder itself: no export, no PyTorch (docs/export.md).

`ReflexLM` is an lm-eval model (registered as `reflex_jax`) with `loglikelihood`,
`loglikelihood_rolling` and `generate_until`. It runs on a mesh with sharded params: a run
directory loaded onto a mesh of this host's devices, or, inside training, the training mesh and
the live params (train/evaluator.py). Tokens are what lm-eval's `hf` model feeds the HF export
(the same transformers tokenizer, the same encoding calls, left truncation to block_size), so
both give the same numbers; `add_bos_token=True` also starts every context with bos, as the
run's training rows start.

Scoring is batched: requests sorted by length, rows padded on the right to a power of two
(sampling.bucket, capped at block_size) and batches to a power of two rows, so a task with
hundreds of lengths compiles a handful of programs. Generation is sampling.Generator's cached
loop, bucketed the same way.

    python -m reflex_jax.lm_eval_model --model reflex_jax --model_args run=runs/tiny --tasks ...
        --batch_size 16

is lm-eval's own command line with this model registered (lm-eval 0.4.13 has no plugin entry
points, so the import registers it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from . import sharding
from .errors import UsageError
from .kernels import DEFAULT, KernelChoices
from .model import Decoder, ModelConfig, abstract_params, param_logical_axes
from .sampling import Generator, bucket

DEFAULT_BATCH_SIZE = 16


class Scorer:
    """Summed log-probabilities of continuations, and whether greedy decoding gives them.

    `score(params, rows)` takes rows (tokens, n): `tokens` (at most block_size + 1 ids) are fed
    without their last id and predict themselves shifted by one; the last `n` predictions are
    the continuation's. The jitted forward keeps the params' own shardings and splits the batch
    over the mesh's batch axes; `compiled_shapes` lists the (rows, length) of every compile.
    """

    def __init__(self, cfg: ModelConfig, mesh, *, batch_size: int,
                 kernels: KernelChoices = DEFAULT, compiler_options: Optional[dict] = None):
        self.cfg, self.mesh = cfg, mesh
        shards = sharding.batch_shards(mesh)
        self.rows = -(-int(batch_size) // shards) * shards  # a multiple of the batch shards
        self.shards = shards
        self.compiled_shapes: list[tuple[int, int]] = []
        self.batch = sharding.batch_sharding(mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rules = sharding.logical_rules_for_flax(mesh)
        model = Decoder(cfg, kernels=kernels)

        def score(params, tokens_BT, targets_BT, weights_BT):
            import flax.linen as nn
            self.compiled_shapes.append(tuple(tokens_BT.shape))  # runs only while tracing
            with nn.logical_axis_rules(rules):
                logits = model.apply({"params": params}, tokens_BT).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
            greedy = (jnp.argmax(logits, axis=-1) == targets_BT) | (weights_BT == 0)
            return jnp.sum(picked * weights_BT, axis=1), jnp.all(greedy, axis=1)

        # inputs keep their shardings (params as placed, batches split by _put)
        self._score = jax.jit(score, out_shardings=(replicated, replicated),
                              compiler_options=compiler_options)

    def score(self, params, rows: Sequence[tuple[Sequence[int], int]],
              progress=None) -> list[tuple[float, bool]]:
        L = self.cfg.block_size
        out: list = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first
        for start in range(0, len(order), self.rows):
            chunk = order[start:start + self.rows]
            T = bucket(max(len(rows[i][0]) - 1 for i in chunk), L)
            B = min(1 << (len(chunk) - 1).bit_length(), self.rows)
            B = -(-B // self.shards) * self.shards
            tokens = np.zeros((B, T), np.int32)  # right padding: causal, never seen by real rows
            targets = np.zeros((B, T), np.int32)
            weights = np.zeros((B, T), np.float32)
            for r, i in enumerate(chunk):
                ids, n = rows[i]
                k = len(ids) - 1
                tokens[r, :k], targets[r, :k] = ids[:-1], ids[1:]
                weights[r, k - n:k] = 1.0
            ll, greedy = self._score(params, *(_put(a, self.batch) for a in
                                               (tokens, targets, weights)))
            ll, greedy = _local(ll), _local(greedy)
            for r, i in enumerate(chunk):
                out[i] = (float(ll[r]), bool(greedy[r]))
            if progress is not None:
                progress.update(len(chunk))
        return out


def _put(x: np.ndarray, where) -> jax.Array:
    """A global array from the same host array on every process."""
    return jax.make_array_from_callback(x.shape, where, lambda index: x[index])


def _local(x: jax.Array) -> np.ndarray:
    """A replicated array's value, read from this process's copy."""
    return np.asarray(x.addressable_data(0))


def _int(name: str, value, minimum: int) -> int:
    """A model argument as an integer (lm-eval passes ints; a command line may pass text)."""
    ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.strip().isdigit())
    if not ok or int(value) < minimum:
        raise UsageError(f"{name}={value!r} must be an integer >= {minimum}.")
    return int(value)


def _registered(cls):
    """Registered as lm-eval's `reflex_jax` model (once: not again when run as __main__)."""
    return cls if __name__ == "__main__" else register_model("reflex_jax")(cls)


@_registered
class ReflexLM(TemplateLM):
    """lm-eval's model interface on a reflex_jax decoder.

    From a run: `ReflexLM(run="runs/tiny", step=None, batch_size=16, fsdp=1, tensor=1)` loads
    the best checkpoint (or `step`) onto a mesh of this host's devices (data x fsdp x tensor,
    data the rest) with the tokenizer the run's meta.json names. In a training run:
    `ReflexLM(model_config=..., tokenizer=..., mesh=..., kernels=...)` and `lm.params = live
    params` (placed on that mesh) before each evaluation. `add_bos_token`: start every context with
    the tokenizer's bos (default off, as lm-eval's `hf` model does with the export's tokenizer).
    `max_length` defaults to block_size.
    """

    def __init__(self, run: Optional[str] = None, step=None, batch_size=DEFAULT_BATCH_SIZE,
                 max_length=None, add_bos_token=False, fsdp=1, tensor=1, *,
                 model_config: Optional[ModelConfig] = None, params=None,
                 tokenizer: Optional[str] = None, mesh=None,
                 kernels: KernelChoices = DEFAULT, quiet: bool = False,
                 compiler_options: Optional[dict] = None, **lm_eval_args):
        super().__init__()
        # lm-eval's command line adds max_batch_size and device: JAX places on its own devices
        lm_eval_args.pop("max_batch_size", None)
        lm_eval_args.pop("device", None)
        if lm_eval_args:
            raise UsageError(f"the reflex_jax model takes no argument {next(iter(lm_eval_args))!r}; "
                             "it takes run, step, batch_size, max_length, add_bos_token, fsdp "
                             "and tensor.")
        if run is not None:
            from .checkpoint import load_params
            from .harness import run_tokenizer
            tokenizer = run_tokenizer(run)
            model_config, host_params = load_params(
                run, step=None if step in (None, "") else _int("step", step, 0))
            mesh = sharding.make_mesh(-1, _int("fsdp", fsdp, 1), _int("tensor", tensor, 1))
            params = jax.device_put(host_params, sharding.shardings_for(
                param_logical_axes(model_config), abstract_params(model_config), mesh))
        elif model_config is None or tokenizer is None or mesh is None:
            raise UsageError("the reflex_jax model needs run=<run directory> (or, from code, "
                             "model_config, tokenizer and mesh).")
        self.cfg, self.mesh, self.params = model_config, mesh, params
        if isinstance(batch_size, str) and not batch_size.strip().isdigit():
            batch_size = DEFAULT_BATCH_SIZE  # lm-eval's "auto": one size fits the bucketed compiles
        self._batch_size = _int("batch_size", batch_size, 1)
        self._max_length = (model_config.block_size if max_length in (None, "")
                            else _int("max_length", max_length, 2))
        if self._max_length > model_config.block_size:
            raise UsageError(f"max_length={self._max_length} exceeds the model's block_size="
                             f"{model_config.block_size}; leave it out (it defaults to block_size).")
        self.add_bos_token = str(add_bos_token).lower() in ("true", "1", "yes")
        from .interop.hf_export import hf_tokenizer
        self.tokenizer = hf_tokenizer(tokenizer, model_config)  # what the HF export writes
        self.quiet = quiet or jax.process_index() != 0
        self.scorer = Scorer(model_config, mesh, batch_size=self._batch_size,
                             kernels=kernels, compiler_options=compiler_options)
        self.generator = Generator(model_config, compiler_options=compiler_options)

    # ---- tokens ---------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> list[int]:
        """lm-eval's `hf` model's encoding (a string that starts with bos text gets no specials),
        with bos in front when add_bos_token asks for it."""
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        if (self.add_bos_token and add_special_tokens is not False
                and ids[:1] != [self.prefix_token_id]):
            ids = [self.prefix_token_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- log-likelihoods ------------------------------------------------------------------------

    def _need_params(self):
        if self.params is None:
            raise UsageError("the reflex_jax model has no params; set lm.params (the live "
                             "params) before evaluating.")
        return self.params

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """(log p(continuation | context), greedy) per (key, context ids, continuation ids);
        context + continuation longer than max_length + 1 lose tokens on the left, as in lm-eval's
        `hf` model."""
        params, L = self._need_params(), self.max_length
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise UsageError("an lm-eval request has an empty continuation; the task must "
                                 "give every choice at least one token.")
            ids = (list(context) + list(continuation))[-(L + 1):]
            rows.append((ids, min(len(continuation), len(ids) - 1)))
        bar = tqdm(total=len(rows), disable=disable_tqdm or self.quiet,
                   desc="Running loglikelihood requests")
        out = self.scorer.score(params, rows, progress=bar)
        bar.close()
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood in disjoint windows of max_length tokens, each after
        the one before it, the first after the prefix token (lm-eval's windows)."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(string, add_special_tokens=False if self.add_bos_token else None)
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + w)
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with the task's temperature) continuations, cut at the first stop
        string. Rows stop early at eos and at stop strings that are one token and cannot begin
        inside an earlier token's text; the rest are cut from the text, as lm-eval does."""
        params = self._need_params()
        if jax.process_count() > 1:  # every process generates alone from a full copy
            params = sharding.gather_to_host(params, self.mesh)
        groups: dict = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append((i, context, gen_kwargs))
        out: list = [None] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for group in groups.values():
            kwargs = normalize_gen_kwargs(dict(group[0][2]), 256)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise UsageError(f"the task asks for max_gen_toks={max_new} new tokens but the "
                                 f"model's context is {self.max_length}; lower max_gen_toks in "
                                 "the task's generation_kwargs.")
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", False):
                temperature = 0.0
            prompts = [self.tok_encode(context, left_truncate_len=self.max_length - max_new)
                       or [self.prefix_token_id] for _, context, _ in group]
            pad = self.tokenizer.pad_token_id
            rows = self.generator.generate(
                params, prompts, max_new_tokens=max_new, temperature=temperature,
                top_k=int(kwargs.get("top_k", 0) or 0), top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                eos_id=self.eot_token_id, pad_id=pad if pad is not None else self.eot_token_id,
                batch_size=self.batch_size, stop_ids=self._stop_ids(until))
            for (i, context, gen_kwargs), ids in zip(group, rows):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def _stop_ids(self, until: Sequence[str]) -> list[int]:
        """Token ids that may end a row: a stop string that is exactly one token, has no proper
        prefix that is also its suffix, and is in no other stop string, can first occur only as
        that token, so stopping there cuts the text where lm-eval's cut would."""
        ids = []
        for s in until:
            if not s or _has_border(s) or any(s in o for o in until if o and o != s):
                continue
            enc = self.tokenizer.encode(s, add_special_tokens=False)
            if len(enc) == 1 and self.tok_decode(enc) == s:
                ids.append(enc[0])
        return ids


def _has_border(s: str) -> bool:
    return any(s[:k] == s[-k:] for k in range(1, len(s)))


def main() -> None:
    """lm-eval's command line with this model registered (`--model reflex_jax`)."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    import reflex_jax.lm_eval_model  # noqa: F401 - registers the package's ReflexLM
    main()
