"""Compute kernels behind the model: attention, the f32-accumulating linear, the fused loss.

The model and the trainer choose among them only through `KernelChoices`; each kernel module has
one dispatch function (`attention.multihead_attention`, `linear.linear`,
`cross_entropy.weighted_cross_entropy_sum`). Every switch defaults to the optimised kernel;
turning one off selects the plain formulation that XLA's autodiff handles by itself, which is
what bench.py's ablation measures against.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelChoices:
    """Which optimised kernels a model / train step uses (all on by default).

    fused_loss: chunked cross-entropy that never materialises [B*T, vocab] float32 logits
        (off: log-softmax over the full logits).
    f32_linear: linear layers with written-out forward/backward, compute-dtype operands and
        float32 accumulation (off: flax nn.DenseGeneral with autodiff).
    attention_blocks: on CPU, causal attention in query blocks that skip fully masked keys
        (off: one dense causal call).
    blockwise_backward: on CPU, the query-blocked attention with a FlashAttention-style
        written-out backward (off: autodiff through the blocked calls).
    """
    fused_loss: bool = True
    f32_linear: bool = True
    attention_blocks: bool = True
    blockwise_backward: bool = True


DEFAULT = KernelChoices()
