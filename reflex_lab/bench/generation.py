"""Generation contenders: the KV-cache `Generator`, re-running the whole prefix for every token
(`make_recompute`, what the original did), and for the vanilla GPT-2 config HF
`GPT2LMHeadModel.generate` on the same weights. All greedy, float32."""
from __future__ import annotations

import contextlib
import io
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from reflex_jax.model import Decoder, ModelConfig, head_matrix, init_params, logits_from_hidden
from reflex_jax.sampling import Generator

from .settings import BenchSettings
from .timing import interleaved, median


def make_recompute(cfg: ModelConfig) -> Callable:
    """What the original did: every new token runs the full forward over the whole current prefix
    (compiled once per prefix length; logits for the last position only; greedy).
    Returns generate(params, prompts_BP, n) -> the n new tokens [B, n] as numpy."""

    @jax.jit
    def extend(params, tokens_BT):
        h_BTE = Decoder(cfg).apply({"params": params}, tokens_BT, return_hidden=True)
        logits_BV = logits_from_hidden(h_BTE[:, -1:], head_matrix(cfg, params))[:, 0]
        next_B1 = jnp.argmax(logits_BV, -1)[:, None].astype(tokens_BT.dtype)
        return jnp.concatenate([tokens_BT, next_B1], 1)

    def generate(params, prompts_BP, n):
        prompts_BP = np.asarray(prompts_BP)
        tokens = jnp.asarray(prompts_BP, jnp.int32)
        for _ in range(n):
            tokens = extend(params, tokens)
        return np.asarray(tokens)[:, prompts_BP.shape[1]:]
    return generate


def hf_gpt2_and_params(cfg: ModelConfig, seed: int = 0):
    """A randomly initialised HF GPT2LMHeadModel and the same weights as this project's params."""
    import torch
    import transformers
    from reflex_jax.interop.hf_gpt2 import Source, convert_gpt2
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.hidden, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=True, bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    tensors = {k[len("transformer."):] if k.startswith("transformer.") else k: v.detach().numpy()
               for k, v in model.state_dict().items()}
    source = Source("random HF GPT-2", "", None, hf_cfg.to_dict(), tensors, ["(in memory)"])
    with contextlib.redirect_stdout(io.StringIO()):
        params, _ = convert_gpt2(cfg, source)
    return model, params


def hf_generate(model, prompts_BP: np.ndarray, n: int) -> np.ndarray:
    import torch
    ids = torch.from_numpy(np.asarray(prompts_BP, np.int64))
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                             eos_token_id=None)
    return out[:, ids.shape[1]:].numpy()


def gen_config(s: BenchSettings, reflex: str, **over) -> ModelConfig:
    block = max(s.gen_prompts) + s.gen_new_tokens
    fields = s.model_fields(reflex, "float32", block_size=block)
    fields.update(over)
    return ModelConfig(**fields)


class _Contenders:
    """The generators of one bench run, built (and their weights made) once for every prompt."""

    def __init__(self, s: BenchSettings, with_hf: bool, notes: dict):
        self.N, self.K = s.gen_new_tokens, s.gen_recompute_tokens
        cfg = gen_config(s, "all")
        self.params = init_params(cfg, jax.random.PRNGKey(0))
        self.gen, self.recompute = Generator(cfg), make_recompute(cfg)
        vcfg = gen_config(s, "none", norm="layernorm", mlp="gelu")
        self.hf_model = self.vparams = None
        if with_hf:
            try:
                self.hf_model, self.vparams = hf_gpt2_and_params(vcfg)
            except Exception as e:  # noqa: BLE001 - no transformers / torch: a note, not a crash
                notes["hf_note"] = f"HF GPT-2 skipped: {type(e).__name__}: {str(e)[:200]}"
        self.vgen = Generator(vcfg)

    def row(self, prompts_BP: np.ndarray, reps: int, log) -> dict:
        """Tokens/s of every contender on these prompts, and whether their greedy tokens agree."""
        B, P = prompts_BP.shape
        N, K, plist = self.N, self.K, prompts_BP.tolist()
        fns = {"cached": lambda: self.gen.generate(self.params, plist, max_new_tokens=N),
               "recompute": lambda: self.recompute(self.params, prompts_BP, K)}
        # both compile here; greedy tokens must agree where both produced them
        same = np.array_equal(np.asarray(fns["cached"]())[:, :K], fns["recompute"]())
        if self.hf_model is not None:
            fns["vanilla cached"] = lambda: self.vgen.generate(self.vparams, plist, max_new_tokens=N)
            fns["hf generate"] = lambda: hf_generate(self.hf_model, prompts_BP, N)
            ours, theirs = np.asarray(fns["vanilla cached"]()), fns["hf generate"]()
            hf_agree = float(np.mean(ours == theirs))
        log(f"## generation prompt {P} batch {B}")
        times = interleaved(fns, reps, log)
        row = {"prompt": P, "batch": B, "cached_tok_s": B * N / median(times["cached"]),
               "recompute_tok_s": B * K / median(times["recompute"]),
               "greedy_same_tokens": bool(same)}
        row["cached_vs_recompute"] = row["cached_tok_s"] / row["recompute_tok_s"]
        if self.hf_model is not None:
            row["vanilla_cached_tok_s"] = B * N / median(times["vanilla cached"])
            row["hf_tok_s"] = B * N / median(times["hf generate"])
            row["ours_vs_hf"] = row["vanilla_cached_tok_s"] / row["hf_tok_s"]
            row["hf_greedy_token_agreement"] = hf_agree
        return row


def run_generation(s: BenchSettings, log: Callable[[str], None], with_hf: bool) -> dict:
    """One row per (prompt length, batch) of s.gen_prompts x s.gen_batches."""
    out: dict = {"rows": [], "new_tokens": s.gen_new_tokens,
                 "recompute_tokens": s.gen_recompute_tokens, "dtype": "float32"}
    rng = np.random.default_rng(1)
    gens = _Contenders(s, with_hf, out)
    for P in s.gen_prompts:
        for B in s.gen_batches:
            prompts_BP = rng.integers(0, s.vocab_size, (B, P)).astype(np.int32)
            out["rows"].append(gens.row(prompts_BP, s.gen_reps, log))
    return out
