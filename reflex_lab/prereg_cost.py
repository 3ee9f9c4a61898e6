"""What each primary arm of the pre-registered study costs: parameters, KV-cache bytes and train
FLOPs per token (from the config, nothing trained), and cached decoding speed, every arm timed
side by side in interleaved rounds on the same prompts, with its ratio to `none` and that ratio's
95% interval (bench/stats.py). Decoding speed depends on shapes only, so each arm decodes with
freshly initialised weights of its own config."""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, Sequence

import numpy as np

from . import prereg
from .bench.stats import fmt_ratio

STUDY_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "study.py")


def arm_config(arm: str, block: int = prereg.BLOCK):
    """configs/study.py with `arm`'s head plan (and value residual) at context `block`."""
    from reflex_jax.run_config import load_config
    return load_config(STUDY_CONFIG, prereg.arm_model(arm, block))


def static_costs(arms: Sequence[str] = prereg.ARMS) -> dict:
    """{arm: {"params", "kv_bytes_per_token", "train_flops_per_token", ...}} (compare.stats)."""
    from .compare.stats import model_facts
    return {arm: model_facts(arm_config(arm)) for arm in arms}


def decode_speed(arms: Sequence[str] = prereg.ARMS, *, batches: Sequence[int] = (1, 8),
                 prompt: int = 64, new_tokens: int = 192, reps: int = 8,
                 log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """One row per batch size: every arm's cached greedy decoding of `new_tokens` after a
    `prompt`-token prompt (the window's 256 slots by default), its median tokens/s over `reps`
    interleaved rounds, and its time per call over `none`'s as a paired ratio with a 95% interval
    (above 1: slower than vanilla)."""
    import jax

    from reflex_jax.model import init_params
    from reflex_jax.run_config import model_config_from
    from reflex_jax.sampling import Generator

    from .bench.stats import paired_ratio
    from .bench.timing import interleaved, median

    models = {}
    for arm in arms:
        cfg = model_config_from(arm_config(arm))
        models[arm] = (Generator(cfg), init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        prompts = rng.integers(0, 256, (batch, prompt)).tolist()

        def decode(arm, prompts=prompts):
            gen, params = models[arm]
            return lambda: gen.generate(params, prompts, max_new_tokens=new_tokens)
        fns = {arm: decode(arm) for arm in arms}
        for fn in fns.values():  # compile outside the timed rounds
            fn()
        log(f"decode: batch {batch}, prompt {prompt}, {new_tokens} new tokens, {reps} rounds")
        times = interleaved(fns, reps, log)
        base = arms[0]
        rows.append({"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "reps": reps,
                     "tok_s": {a: batch * new_tokens / median(times[a]) for a in arms},
                     "time_vs_" + base: {a: paired_ratio(times[a], times[base]) for a in arms[1:]},
                     "times_s": times})
    return rows


def measure(cpu: str, reps: int = 8, log: Callable[[str], None] = lambda s: None) -> dict:
    """The cost JSON the report reads (experiments/prereg/cost.json); `cpu` names the machine as
    the study's run files do."""
    import jax
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": platform.machine(), "cpu": cpu, "jax": jax.__version__,
            "static": static_costs(), "decode": decode_speed(reps=reps, log=log)}


def cost_table(cost: dict) -> list[str]:
    """The report's cost section: one row per arm."""
    static, decode = cost["static"], cost["decode"]
    base = prereg.ARMS[0]
    head = ("| arm | params | KV bytes/token | train FLOPs/token | "
            + " | ".join(f"decode tok/s, batch {r['batch']} | time vs `{base}`" for r in decode) + " |")
    lines = ["", "## Cost", "",
             f"Static figures from the config (KV bytes in {static[base]['kv_dtype']}); decoding "
             f"measured on {cost['cpu']} ({cost['date'][:10]}, jax {cost['jax']}): greedy, "
             f"{decode[0]['new_tokens']} new tokens after {decode[0]['prompt']}, every arm in "
             f"{decode[0]['reps']} interleaved rounds, median tokens/s and the paired time ratio "
             "with its 95% interval.", "", head,
             "|---|---:|---:|---:|" + "---:|---|" * len(decode)]
    for arm in prereg.ARMS:
        f = static[arm]
        cells = [f"`{arm}`", f"{f['params']:,}", f"{f['kv_bytes_per_token']:,}",
                 f"{f['train_flops_per_token'] / 1e6:.2f} M"]
        for r in decode:
            ratio = r[f"time_vs_{base}"].get(arm)
            cells += [f"{r['tok_s'][arm]:,.0f}", fmt_ratio(ratio) if ratio else "1"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
