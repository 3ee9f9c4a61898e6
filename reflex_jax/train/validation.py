"""Held-out metrics from one compiled pass over each validation batch.

The eval step computes every target's cross-entropy once and sums it three ways:

* `val_loss` (and `val_ppl`): mean CE in nats over the targets the run trains on (`data.loss_on`);
* `val_bpb`: bits per byte over those same targets, sum CE / (ln 2 · their UTF-8 bytes), where a
  token's bytes come from the tokenizer's `byte_lengths()` table (specials count 0 bytes, their CE
  still counts), so runs with different tokenizers compare;
* `val_answer_loss`: mean CE over answer tokens only (the data's answer mask, which includes the
  closing eos) whatever `loss_on` is; logged for question/answer rows (prepared template rows and
  built-in tasks), not for plain text, whose mask covers every token.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..kernels.cross_entropy import per_token_cross_entropy
from ..model import head_matrix
from .step import StepSettings, hidden_states, loss_weights

SUM_KEYS = ("loss", "tokens", "bytes", "answer_loss", "answer_tokens")


def run_byte_lengths(data, vocab_size: int) -> np.ndarray:
    """int32 [vocab_size]: the UTF-8 bytes of each token id of the data's tokenizer (0 for ids past
    its vocabulary); ones without data (a TrainProgram built from shapes needs only the shape)."""
    if data is None:
        return np.ones(vocab_size, np.int32)
    table = np.asarray(data.tokenizer().byte_lengths(), np.int32)[:vocab_size]
    return np.pad(table, (0, vocab_size - len(table)))


def has_answers(meta: dict) -> bool:
    """Whether the data is question/answer rows (an answer mask worth its own loss)."""
    return meta.get("kind") == "rows"


def token_losses(s: StepSettings, params, batch: dict):
    """Cross-entropy in nats [B, S-1] of each next token of the batch's tokens (its documents
    kept apart where it has segment ids)."""
    hidden_BTE = hidden_states(s, params, batch)
    with jax.named_scope("lm_head_loss"):  # never [B*T, vocab] float32 logits with fused_loss
        return per_token_cross_entropy(hidden_BTE, head_matrix(s.model.cfg, params),
                                       batch["tokens"][:, 1:], s.kernels)


def eval_sums(s: StepSettings, byte_lengths_V, params, batch: dict) -> dict:
    """The SUM_KEYS sums of one validation batch: CE and weight over the trained-on targets, their
    bytes, and CE and count over the answer targets; `batch["valid"]` marks real rows/tokens."""
    tokens_BS, mask_BS, valid_BS = batch["tokens"], batch["mask"], batch["valid"]
    ce_BT = token_losses(s, params, batch)
    w_BT = loss_weights(mask_BS, s.loss_on, valid_BS)
    answer_BT = loss_weights(mask_BS, "answer", valid_BS)
    bytes_BT = jnp.asarray(byte_lengths_V, jnp.float32)[tokens_BS[:, 1:]]
    return {"loss": jnp.sum(ce_BT * w_BT), "tokens": jnp.sum(w_BT),
            "bytes": jnp.sum(bytes_BT * w_BT), "answer_loss": jnp.sum(ce_BT * answer_BT),
            "answer_tokens": jnp.sum(answer_BT)}


def total(batch_sums: Sequence[dict]) -> dict:
    """The per-batch sums added up in float64 on the host."""
    fetched = jax.device_get(list(batch_sums))
    return {k: math.fsum(float(b[k]) for b in fetched) for k in SUM_KEYS}


def val_metrics(batch_sums: Sequence[dict], answers: bool) -> dict:
    """val_loss, val_ppl, val_bpb and (for question/answer data, `answers`) val_answer_loss."""
    t = total(batch_sums)
    val_loss = t["loss"] / max(t["tokens"], 1.0)
    out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
           "val_bpb": bits_per_byte(t["loss"], t["bytes"])}
    if answers:
        out["val_answer_loss"] = t["answer_loss"] / max(t["answer_tokens"], 1.0)
    return out


def bits_per_byte(ce_nats: float, n_bytes: float) -> Optional[float]:
    """Summed CE in nats over the bytes it predicted, in bits; None when no byte was predicted."""
    return ce_nats / (math.log(2) * n_bytes) if n_bytes > 0 else None
