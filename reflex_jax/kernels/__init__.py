"""Compute kernels behind the model: attention, the f32-accumulating linear, the fused loss.

The model and the trainer choose among them only through `KernelChoices`; each kernel module has
one dispatch function (`attention.multihead_attention`, `linear.linear`,
`cross_entropy.weighted_cross_entropy_sum`). Every switch defaults to the optimised kernel;
turning one off selects the plain formulation that XLA's autodiff handles by itself, which is
what bench.py's ablation measures against.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional


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
    platform: the platform the step is compiled for ('cpu', 'gpu', 'tpu'), which picks the
        platform's kernels; None: `mesh`'s platform, else the default backend. The trainer sets
        it from its mesh's devices, so a step compiled for a TPU or GPU target on a CPU machine
        gets that target's kernels.
    mesh: the jax.sharding.Mesh the step is compiled over, for kernels that must be wrapped in
        shard_map (the Pallas TPU attention); None: the mesh of an enclosing `jax.set_mesh`, or
        no shard_map (one device). Its devices also give the platform when `platform` is None.
    pallas_interpret: run Pallas kernels in interpret mode (tests: the TPU kernel on a CPU).
    """
    fused_loss: bool = True
    f32_linear: bool = True
    attention_blocks: bool = True
    blockwise_backward: bool = True
    platform: Optional[str] = None
    mesh: Optional[Any] = None
    pallas_interpret: bool = False

    def resolved_platform(self) -> str:
        """`platform`, else the platform of `mesh`'s devices, else JAX's default backend."""
        import jax
        if self.platform:
            return self.platform
        if self.mesh:
            return self.mesh.devices.flat[0].platform
        return jax.default_backend()


# the optimised-kernel switches (the other fields say where the step runs, not what it computes)
SWITCHES = ("fused_loss", "f32_linear", "attention_blocks", "blockwise_backward")
DEFAULT = KernelChoices()
