"""The pre-registered study of docs/study.md: its data (the six training authors in chunks, 2% of
each author's chunks held out as the dev split; Turgenev is the test text), its runs (stage A: each
primary arm at three learning rates; stage B: each arm at its dev-chosen rate, five seeds; stage
D: each arm at that rate on associative recall, three seeds), and its
report (the dev table, every paired contrast with its interval, Holm-adjusted, and the verdict of
the rule as written before the runs). `scripts/prereg_study.py` runs it; this module holds what the
tests check."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional, Sequence

import numpy as np

AUTHORS = ("chekhov", "dostoevsky", "gogol", "lermontov", "pushkin", "tolstoy")
TEST_AUTHOR = "turgenev"
# the primary arms: the plan, and whether layer l >= 1's values mix in layer 0's (ResFormer)
ARMS = ("none", "all", "kv:8,7,6,5,4,3", "none+value_residual")
BASELINE = "all"
TARGET = "kv:8,7,6,5,4,3"          # the contrast the rule is about: same KV bytes, params, FLOPs
VALUE_CONTROL = "none+value_residual"
LRS = (1.5e-3, 3e-3, 6e-3)
SEEDS_B = (0, 1, 2, 3, 4)
SEEDS_D = (0, 1, 2)
BLOCK, BATCH = 256, 12             # 3,072 tokens a step
BLOCKS = {"A": BLOCK, "B": BLOCK, "D": 512}
STEPS = {"A": 1650, "B": 3300, "D": 1650}  # 5.07 M, 10.14 M and (at 512) 10.14 M training tokens
RECALL_PAIRS = 8                   # stage D rows: 8 pairs, every one asked (queries = n_pairs)
MIN_EFFECT = 0.01                  # bits per byte, the rule's smallest effect and ResFormer margin
LEVEL = 0.95
CHUNK_BYTES = 32768
DEV_FRACTION = 0.02


@dataclasses.dataclass(frozen=True)
class Run:
    stage: str
    arm: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.]+", "-", self.arm).strip("-")
        return f"{slug}-lr{self.lr:g}-s{self.seed}"

    @property
    def steps(self) -> int:
        return STEPS[self.stage]

    @property
    def block(self) -> int:
        return BLOCKS[self.stage]

    def overrides(self, data_dir: str, run_dir: str) -> list[str]:
        """train.py's --config flags on top of configs/study.py (stage D trains on kv_recall rows,
        not on `data_dir`)."""
        steps = self.steps
        if self.stage == "D":
            data = ["--config.data.task=kv_recall",
                    f"--config.data.task_options.n_pairs={RECALL_PAIRS}",
                    f"--config.data.task_options.queries={RECALL_PAIRS}",
                    "--config.data.loss_on=answer", "--config.eval_exact_match=64"]
        else:
            data = [f"--config.data.dir={data_dir}"]
        return data + [f"--config.run_dir={run_dir}"] + [
            f"--config.{key}={value}" for key, value in arm_model(self.arm, self.block)] + [
            f"--config.batch_size={BATCH}",
            f"--config.max_steps={steps}", f"--config.seed={self.seed}",
            f"--config.optim.lr={self.lr}", f"--config.optim.min_lr={self.lr / 30}",
            "--config.optim.warmup_steps=100", "--config.data.document_mask=True",
            f"--config.eval_interval={steps // 6}", "--config.eval_batches=16",
            "--config.checkpoint_interval=150", "--config.keep_checkpoints=1",
            "--config.log_interval=50"]


def arm_model(arm: str, block: int) -> list[tuple[str, str]]:
    """The config overrides that make configs/study.py's model `arm` at context `block`: its head
    plan, and whether later layers mix in layer 0's values (`+value_residual`)."""
    plan, _, extra = arm.partition("+")
    return [("model.head_plan", plan), ("model.value_residual", str(extra == "value_residual")),
            ("model.block_size", str(block))]


def stage_a_runs() -> list[Run]:
    return [Run("A", arm, lr, 0) for arm in ARMS for lr in LRS]


def stage_b_runs(chosen: dict) -> list[Run]:
    """Seed-major, so that a partial stage B has whole seeds of every arm whose lr is chosen."""
    return [Run("B", arm, chosen[arm], seed) for seed in SEEDS_B for arm in ARMS if arm in chosen]


def stage_d_runs(chosen: dict) -> list[Run]:
    """Seed-major, as stage B."""
    return [Run("D", arm, chosen[arm], seed) for seed in SEEDS_D for arm in ARMS if arm in chosen]


# ---------------------------------------------------------------------------------------- data

def chunk_text(text: str, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """`text` cut at line ends into pieces of at least `chunk_bytes` UTF-8 bytes (the last may be
    shorter); joined they give `text` back."""
    chunks, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line.encode("utf-8"))
        if size >= chunk_bytes:
            chunks.append("".join(cur))
            cur, size = [], 0
    if cur:
        chunks.append("".join(cur))
    return chunks


def dev_choice(n: int, fraction: float, rng: np.random.Generator) -> set:
    """round(n * fraction) indices of n (at least one; none when n < 2), drawn by `rng`."""
    if n < 2:
        return set()
    k = min(n - 1, max(1, round(n * fraction)))
    return set(int(i) for i in rng.choice(n, k, replace=False))


def split_authors(text_root: str, out: str, authors: Sequence[str] = AUTHORS,
                  fraction: float = DEV_FRACTION, chunk_bytes: int = CHUNK_BYTES,
                  seed: int = 0) -> dict:
    """Write each author's .txt files, cut into chunks, to out/train/<author>/ and out/dev/<author>/
    (`fraction` of every author's chunks to dev, drawn with `seed`); returns byte counts. The same
    inputs always give the same files."""
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "dev": 0, "dev_chunks": 0, "chunks": 0}
    for author in authors:
        chunks = []
        for path in sorted(_txt_files(os.path.join(text_root, author))):
            with open(path, encoding="utf-8") as f:
                stem = os.path.splitext(os.path.basename(path))[0]
                chunks += [(f"{stem}.{i:03d}", c) for i, c in enumerate(chunk_text(f.read(), chunk_bytes))]
        dev = dev_choice(len(chunks), fraction, rng)
        for i, (name, text) in enumerate(chunks):
            split = "dev" if i in dev else "train"
            d = os.path.join(out, split, author)
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, name + ".txt")
            data = text.encode("utf-8")
            if not (os.path.exists(path) and open(path, "rb").read() == data):
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(path + ".tmp", path)
            counts[split] += len(data)
            counts["dev_chunks"] += split == "dev"
            counts["chunks"] += 1
    return counts


def _txt_files(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no author directory {root!r}; give --shared the directory that holds "
                                "ru_text/.")
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".txt")]


# -------------------------------------------------------------------------------------- report

def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> dict:
    """Mean of paired differences with its Student t interval and two-sided p value (n - 1 df)."""
    x = np.asarray(diffs, float)
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else None, "ci95": None, "p": None,
           "per_seed": x.tolist()}
    if n > 1:
        from scipy.stats import t
        se = float(x.std(ddof=1) / math.sqrt(n))
        half = float(t.ppf(0.5 + level / 2, n - 1)) * se
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
        out["p"] = float(2 * t.sf(abs(out["mean"]) / se, n - 1)) if se > 0 else (0.0 if out["mean"] else 1.0)
    return out


def holm(pvalues: dict) -> dict:
    """Holm-adjusted p values (step-down, monotone, capped at 1) of named raw p values."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = running
    return out


def holm_interval(diffs: Sequence[float], rank: int, m: int) -> Optional[list]:
    """The interval that goes with Holm's step `rank` (0 = smallest p) of m: level 1 - 0.05/(m - rank)."""
    r = paired_interval(diffs, 1 - (1 - LEVEL) / (m - rank))
    return r["ci95"]


def contrasts(bpb: dict, baseline: str = BASELINE, others: Sequence[str] = ()) -> dict:
    """Paired (by seed) contrasts bpb[baseline] - bpb[other] for each other arm, with raw and
    Holm-adjusted p values and the Holm-level interval. `bpb` maps arm -> {seed: value}."""
    others = [a for a in (others or [a for a in bpb if a != baseline]) if a in bpb]
    out = {}
    for other in others:
        seeds = sorted(set(bpb[baseline]) & set(bpb[other]))
        out[other] = paired_interval([bpb[baseline][s] - bpb[other][s] for s in seeds])
        out[other]["seeds"] = seeds
    ps = {k: v["p"] for k, v in out.items() if v["p"] is not None}
    adj = holm(ps)
    for rank, k in enumerate(sorted(ps, key=lambda k: ps[k])):
        out[k]["p_holm"] = adj[k]
        out[k]["ci_holm"] = holm_interval(out[k]["per_seed"], rank, len(ps))
    return out


def verdict(c: dict) -> tuple[str, list[str]]:
    """The rule of docs/study.md on contrasts(...) of `all` against the primary arms: ("helps" |
    "hurts" | "not shown", the reasons, one per clause)."""
    t = c.get(TARGET)
    if not t or t.get("p_holm") is None:
        return "not shown", [f"no paired interval against {TARGET} yet"]
    lo, hi = t["ci_holm"]
    reasons = []
    below = hi < 0 and t["p_holm"] < 1 - LEVEL
    reasons.append(f"1. Δ vs {TARGET} = {t['mean']:+.4f} bpb, Holm-level interval [{lo:+.4f}, {hi:+.4f}], "
                   f"Holm p = {t['p_holm']:.3g}: {'below zero' if below else 'not below zero'}")
    big = abs(t["mean"]) >= MIN_EFFECT
    reasons.append(f"2. |Δ| = {abs(t['mean']):.4f} {'≥' if big else '<'} {MIN_EFFECT}")
    v = c.get(VALUE_CONTROL)
    close = v is not None and v["mean"] is not None and v["mean"] <= MIN_EFFECT
    reasons.append(f"3. Δ vs {VALUE_CONTROL} = " + (f"{v['mean']:+.4f} bpb" if v and v["mean"] is not None
                                                      else "not measured")
                   + f": {'within' if close else 'not within'} +{MIN_EFFECT}")
    if below and big and close:
        return "helps", reasons
    if lo > 0 and t["p_holm"] < 1 - LEVEL:
        return "hurts", reasons
    return "not shown", reasons


def choose_lr(dev: dict) -> dict:
    """Per arm, the lr with the lowest dev bpb, once all of LRS have one. `dev`: arm -> {lr: bpb}."""
    return {arm: min(d, key=d.get) for arm, d in dev.items() if all(lr in d for lr in LRS)}
