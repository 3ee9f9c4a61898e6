"""The tolerance for two computations of the same function in different orders: a cached decode
step against a full forward pass, eager against jit, a fused or blocked kernel against the plain
ops, the model against a float64 recomputation by hand.

Neither result is wrong: every matmul, softmax and norm may sum in another order, and which order
XLA picks depends on the shapes and on the CPU (AVX2, AVX-512 or AMX: vector width, FMA, blocking).
So the difference is rounding noise, about eps(dtype) times the size of the values, and the
independent errors of `depth` layers add up like sqrt(depth). A tolerance tuned on one machine
fails on another: a 4-layer cached decode missed atol 2e-5 on a Zen 3 (2.2e-5, about 18 eps times
the largest logit) while the same check differs by at most 13 eps times the largest logit on a
Zen 5 EPYC. FACTOR = 32 per sqrt(layer) gives 64 eps * max|ref| at 4 layers, over 3x the worst
seen; a real bug (a wrong position, mask or cache slot) moves the values by far more."""
import math

import jax.numpy as jnp
import numpy as np

FACTOR = 32


def order_atol(ref, depth: int = 1, dtype=np.float32) -> float:
    """assert_allclose's atol for a result of `dtype` computed through `depth` layers (a single
    op: 1) against `ref`: FACTOR * eps(dtype) * sqrt(depth) * max|ref|."""
    eps = float(jnp.finfo(dtype).eps)  # jnp's finfo knows bfloat16 too
    return FACTOR * eps * math.sqrt(depth) * float(np.max(np.abs(np.asarray(ref, np.float64))))
