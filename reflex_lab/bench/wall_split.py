"""The train step's wall time split by removal (`bench.py --profile`), for this project and its
PyTorch peer: each contender also runs its forward + backward without the optimizer update, and
its decoder's forward + backward with the LM head and loss replaced by a fixed random projection
of the final hidden states. Timed interleaved with the full step, the differences are the wall
seconds of the optimizer update (step - gradients) and of the LM head + loss (gradients -
decoder). Unlike a profile's per-op thread times, these need no trace (which slows XLA:CPU's
step) and count overlapping ops once."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .timing import interleaved, median

PARTS = ("decoder fwd+bwd", "LM head + loss", "optimizer update")


def _jax_calls(c) -> dict[str, Callable[[], float]]:
    """{"gradients": loss + gradients without the update (returns the mean loss),
    "decoder": the decoder's forward + backward under a random projection of its output}."""
    import jax
    import jax.numpy as jnp
    from reflex_jax.train import step as st
    s, batch = c.program.step_settings, c.batch
    params = jax.tree.map(jnp.copy, c.state.params)  # the step donates (deletes) its state
    B, S = batch["tokens"].shape
    w = st.loss_weights(batch["mask"], s.loss_on)       # the weights the train step uses
    total = max(float(jnp.sum(w)), 1.0)
    r = jnp.asarray(np.random.default_rng(1).standard_normal((B, S - 1, c.cfg.n_embd)), jnp.float32)
    grads = jax.jit(jax.value_and_grad(
        lambda p, b: st.loss_sum(s, p, b, w, None, True))).lower(params, batch).compile()
    decoder = jax.jit(jax.value_and_grad(
        lambda p, b: jnp.sum(st.hidden_states(s, p, b).astype(jnp.float32) * r))
    ).lower(params, batch).compile()
    # each call returns its loss (float() waits for the result)
    return {"gradients": lambda: float(grads(params, batch)[0]) / total,
            "decoder": lambda: float(decoder(params, batch)[0])}


def _torch_calls(c) -> dict[str, Callable[[], float]]:
    """The same two calls for a PyTorch contender (eager, or with the decoder compiled apart)."""
    import torch
    model = c.model
    r = torch.from_numpy(np.random.default_rng(1).standard_normal(
        (*c.x.shape, c.cfg.n_embd)).astype(np.float32))
    hidden = torch.compile(model.hidden) if c.kind == "torch.compile" else model.hidden

    def run(loss_fn):
        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
                loss = loss_fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return float(loss.detach())
        return call
    return {"gradients": run(lambda: c.fwd(c.x, c.y)),
            "decoder": run(lambda: (hidden(c.x).float() * r).sum())}


def calls_of(c) -> dict[str, Callable[[], float]]:
    return _jax_calls(c) if c.kind == "jax" else _torch_calls(c)


def wall_split(cs: dict, reps: int, log: Callable[[str], None] = print) -> dict:
    """{contender: {"step_s", "gradients_s", "decoder_s", "parts": {part: seconds},
    "per_round": {call: its seconds, round by round}}} from
    `reps` interleaved rounds of every contender's three calls (after a warm-up round)."""
    calls = {}
    for name, c in cs.items():
        extra = calls_of(c)
        calls[f"{name} | step"] = c.step
        calls.update({f"{name} | {k}": f for k, f in extra.items()})
    times = interleaved(calls, reps, log, warmup_rounds=1)
    out = {}
    for name in cs:
        step, grads, dec = (median(times[f"{name} | {k}"])
                            for k in ("step", "gradients", "decoder"))
        out[name] = {"step_s": step, "gradients_s": grads, "decoder_s": dec,
                     "parts": dict(zip(PARTS, (dec, grads - dec, step - grads))),
                     "per_round": {k: times[f"{name} | {k}"] for k in ("step", "gradients", "decoder")}}
    return out


def markdown(split: dict, dtype: str) -> list[str]:
    names = list(split)
    lines = ["", f"### {dtype}: wall seconds per step, split by removal (medians, interleaved)", "",
             "| part | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for part in PARTS:
        lines.append(f"| {part} | " + " | ".join(f"{split[n]['parts'][part]:.3f}" for n in names)
                     + " |")
    lines.append("| **step** | " + " | ".join(f"**{split[n]['step_s']:.3f}**" for n in names)
                 + " |")
    return lines
