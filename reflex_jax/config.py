"""Model configuration and the reflex head schedule (DESIGN.md §2).

A schedule says, for every layer, which earlier layers it borrows K/V from and with how many
heads. It resolves once, when the config is built, into a per-layer table (`ModelConfig.layers`):
the rest of the code reads that table and never re-derives the rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Mapping, Optional, Sequence, Union

import jax.numpy as jnp


class ConfigError(ValueError):
    """A user-fixable configuration mistake; the message is one sentence naming the fix."""


@dataclasses.dataclass(frozen=True)
class CrossGroup:
    """`n_heads` query heads of a layer that read K/V heads `source_heads` of layer `source`."""
    source: int
    n_heads: int
    source_heads: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's head split: self heads first, then cross groups in schedule order."""
    layer: int
    n_self: int
    cross: tuple[CrossGroup, ...]

    @property
    def n_cross(self) -> int:
        return sum(g.n_heads for g in self.cross)

    def short(self) -> str:
        return f"{self.n_self}" + (f"+{self.n_cross}" if self.cross else "")


Schedule = tuple[tuple[tuple[int, int], ...], ...]  # per layer: ((source, n_heads), ...)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype_name(value: Any, field: str) -> str:
    if isinstance(value, str):
        name = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                "f16": "float16"}.get(value, value)
    else:
        try:
            name = jnp.dtype(value).name
        except TypeError:
            name = repr(value)
    if name not in _DTYPES:
        raise ConfigError(f"model.{field}={value!r} is not a supported dtype; use one of "
                          f"{', '.join(_DTYPES)}.")
    return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    mlp_hidden: Optional[int] = None          # None -> 4 * n_embd
    norm: str = "rmsnorm"                     # rmsnorm | layernorm
    norm_eps: float = 1e-5
    mlp: str = "swiglu"                       # swiglu | gelu (GPT-2's tanh approximation)
    bias: bool = True
    pos_emb: str = "learned"                  # learned | rope
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: Any = "float32"                    # compute dtype
    param_dtype: Any = "float32"
    reflex: Union[str, Sequence] = "all"      # none | all | recent:c1,c2,... | explicit tuples
    reflex_window: Optional[int] = None       # `all`: at most this many (newest) source layers
    reflex_min_self: int = 1                  # `all`: every layer keeps at least this many self heads
    attention: str = "xla"                    # xla | cudnn (NVIDIA GPU flash attention for training)

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("dtype", _dtype_name(self.dtype, "dtype"))
        set_("param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
        if not isinstance(self.reflex, str):
            set_("reflex", _as_schedule_tuple(self.reflex))
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name}={value!r} must be a positive integer.")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head="
                              f"{self.n_head}; pick sizes with n_embd = n_head * head_dim.")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"pos_emb='rope' needs an even head size, got {self.head_dim}; "
                              "change n_embd or n_head.")
        for name, allowed in (("norm", ("rmsnorm", "layernorm")), ("mlp", ("swiglu", "gelu")),
                              ("pos_emb", ("learned", "rope")), ("attention", ("xla", "cudnn"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; use one of "
                                  f"{' | '.join(allowed)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1).")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"model.mlp_hidden={self.mlp_hidden} must be positive or None.")
        _ = self.layers  # resolve (and validate) the schedule now, not at first use

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    @functools.cached_property
    def layers(self) -> tuple[LayerPlan, ...]:
        return resolve_schedule(self)

    @property
    def kv_heads_total(self) -> int:
        """K/V heads stored across all layers (the KV-cache size in heads)."""
        return sum(p.n_self for p in self.layers)

    def schedule_table(self) -> str:
        """One line for humans, e.g. `all 6x8: 8 | 7+1 | 6+2 | 5+3 | 4+4 | 3+5`."""
        name = self.reflex if isinstance(self.reflex, str) else "explicit"
        return (f"{name} {self.n_layer}x{self.n_head}: "
                + " | ".join(p.short() for p in self.layers))

    def describe_schedule(self) -> str:
        """Multi-line table: every layer's self heads and where each cross group reads."""
        rows = []
        for p in self.layers:
            groups = ", ".join(f"{g.n_heads}<-L{g.source}[heads {','.join(map(str, g.source_heads))}]"
                               for g in p.cross)
            rows.append(f"layer {p.layer}: {p.n_self} self" + (f"; cross {groups}" if groups else ""))
        return "\n".join(rows)

    # ---- comparison ------------------------------------------------------------------------
    RUNTIME_FIELDS = ("attention",)  # how the model computes, not what it is: free on resume

    def model_differences(self, other: "ModelConfig") -> list[str]:
        """Fields (other than RUNTIME_FIELDS) in which `other` describes a different model."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in self.RUNTIME_FIELDS and a[k] != b[k]]

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not isinstance(d["reflex"], str):
            d["reflex"] = [list(map(list, layer)) for layer in d["reflex"]]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(names)}."
                raise ConfigError(f"unknown model config field '{key}'{hint}")
        return cls(**dict(d))


def _as_schedule_tuple(value) -> Schedule:
    try:
        return tuple(tuple((int(src), int(c)) for src, c in layer) for layer in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"model.reflex={value!r} is neither a preset ('none', 'all', 'recent:c1,c2,...') nor a "
            "per-layer tuple of (source_layer, n_heads) pairs.") from None


def _preset(cfg: ModelConfig) -> Schedule:
    L, H, name = cfg.n_layer, cfg.n_head, cfg.reflex.strip()
    if name == "none":
        return tuple(() for _ in range(L))
    if name == "all":
        window = cfg.reflex_window
        if window is not None and window < 0:
            raise ConfigError(f"model.reflex_window={window} must be >= 0 (or None for no limit).")
        schedule = []
        for layer in range(L):
            n_src = layer if window is None else min(layer, window)
            if H - n_src < cfg.reflex_min_self:
                max_window = H - cfg.reflex_min_self
                raise ConfigError(
                    f"reflex 'all': layer {layer} would borrow from {n_src} earlier layers and keep "
                    f"{H - n_src} self heads (< reflex_min_self={cfg.reflex_min_self}) with "
                    f"{H} heads; 'all' never drops sources silently, so set "
                    f"model.reflex_window <= {max_window}.")
            schedule.append(tuple((layer - k, 1) for k in range(1, n_src + 1)))
        return tuple(schedule)
    if name.startswith("recent:"):
        try:
            counts = [int(c) for c in name[len("recent:"):].split(",") if c.strip()]
        except ValueError:
            counts = []
        if not counts or any(c < 0 for c in counts):
            raise ConfigError(f"model.reflex={name!r}: 'recent:' needs non-negative head counts, "
                              "e.g. 'recent:2,1'.")
        return tuple(tuple((layer - k, c) for k, c in enumerate(counts, 1) if layer - k >= 0 and c)
                     for layer in range(L))
    raise ConfigError(f"model.reflex={name!r} is unknown; use 'none', 'all', 'recent:c1,c2,...' "
                      "or a per-layer tuple of (source_layer, n_heads) pairs.")


def resolve_schedule(cfg: ModelConfig) -> tuple[LayerPlan, ...]:
    schedule = _preset(cfg) if isinstance(cfg.reflex, str) else cfg.reflex
    if len(schedule) != cfg.n_layer:
        raise ConfigError(f"model.reflex has {len(schedule)} layer entries but n_layer="
                          f"{cfg.n_layer}; give exactly one tuple of (source, n_heads) per layer.")
    plans: list[LayerPlan] = []
    for layer, groups in enumerate(schedule):
        n_self = cfg.n_head - sum(c for _, c in groups)
        if n_self < 1:
            raise ConfigError(f"reflex schedule: layer {layer} gives {cfg.n_head - n_self} of its "
                              f"{cfg.n_head} heads to cross-attention and keeps {n_self} self heads; "
                              "every layer needs at least 1 self head.")
        cross = []
        for source, c in groups:
            if c < 1:
                raise ConfigError(f"reflex schedule: layer {layer} gives {c} heads to layer "
                                  f"{source}; head counts must be >= 1 (leave the pair out instead).")
            if not 0 <= source < layer:
                raise ConfigError(f"reflex schedule: layer {layer} reads from layer {source}, which "
                                  "is not an earlier layer; sources must be in 0..layer-1.")
            src_self = plans[source].n_self
            if c > src_self:
                raise ConfigError(f"reflex schedule: layer {layer} wants {c} heads of layer {source}, "
                                  f"which has only {src_self} self heads; lower the count.")
            # c heads aimed at layer j read j's *last* c self heads (DESIGN §2).
            cross.append(CrossGroup(source, c, tuple(range(src_self - c, src_self))))
        plans.append(LayerPlan(layer, n_self, tuple(cross)))
    return tuple(plans)
