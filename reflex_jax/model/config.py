"""The model's configuration: sizes, the building blocks, dtypes and the head plan.

`ModelConfig` is frozen and validated when built; its `layers` are the resolved head plan
(model/schedule.py, model/plans.py), one LayerPlan per layer.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Mapping, Optional, Sequence, Union

import jax.numpy as jnp

from ..errors import ConfigError
from ..kernels.attention import BACKENDS as ATTENTION_BACKENDS
from .plans import resolve_plans
from .schedule import LayerPlan, parse_schedule

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


def _head_plan(head_plan, reflex):
    """The head plan from `head_plan` and its old name `reflex` (either may be None), parsed."""
    if reflex is None:
        return parse_schedule("all" if head_plan is None else head_plan)
    if head_plan is not None and parse_schedule(head_plan) != parse_schedule(reflex):
        raise ConfigError(f"model.reflex={reflex!r} is the old name of model.head_plan, which is "
                          f"{head_plan!r}; give the head plan once, as model.head_plan.")
    return parse_schedule(reflex)


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
    head_plan: Union[str, Sequence, None] = None  # docs/attention.md#head-plans; None: "all"
    reflex_window: Optional[int] = None       # `all`: at most this many (newest) source layers
    reflex_min_self: int = 1                  # `all`: every layer keeps at least this many self heads
    value_residual: bool = False              # layer l >= 1's V mixed with layer 0's (ResFormer)
    attention: str = "auto"                   # auto | xla | cudnn | flash (docs/attention.md#backends)
    scan_layers: str = "auto"                 # auto | on | off: scan repeating layers (docs/model.md)
    # the old name of head_plan, accepted as an alias (not stored: to_dict writes head_plan)
    reflex: dataclasses.InitVar[Union[str, Sequence, None]] = None

    def __post_init__(self, reflex):
        set_ = functools.partial(object.__setattr__, self)
        set_("dtype", _dtype_name(self.dtype, "dtype"))
        set_("param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
        set_("head_plan", _head_plan(self.head_plan, reflex))  # explicit schedule text -> tuples
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
                              ("pos_emb", ("learned", "rope")), ("attention", ATTENTION_BACKENDS),
                              ("scan_layers", ("auto", "on", "off"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; use one of "
                                  f"{' | '.join(allowed)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1).")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"model.mlp_hidden={self.mlp_hidden} must be positive or None.")
        if not isinstance(self.value_residual, bool):
            raise ConfigError(f"model.value_residual={self.value_residual!r} must be True or False.")
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
        return resolve_plans(self)

    @property
    def kv_heads_total(self) -> Union[int, float]:
        """K/V heads stored across all layers (the KV-cache size in heads): (K heads + V heads) / 2,
        which is a half-integer only where `sharev:` stores more K than V heads."""
        twice = sum(p.n_k + p.n_v for p in self.layers)
        return twice // 2 if twice % 2 == 0 else twice / 2

    @property
    def classic_heads(self) -> bool:
        """True for the original contract (every layer `LayerPlan.classic`, H query heads, no value
        residual), which code that re-implements the attention (bench's PyTorch peer) covers."""
        return not self.value_residual and all(p.classic and p.n_query == self.n_head
                                               for p in self.layers)

    def schedule_table(self) -> str:
        """One line for humans, e.g. `all 6x8: 8 | 7+1 | 6+2 | 5+3 | 4+4 | 3+5`."""
        name = self.head_plan if isinstance(self.head_plan, str) else "explicit"
        return (f"{name} {self.n_layer}x{self.n_head}: "
                + " | ".join(p.short() for p in self.layers)
                + (" (value residual)" if self.value_residual else ""))

    def describe_schedule(self) -> str:
        """Multi-line table: every layer's self heads and where each cross group reads."""
        rows = [p.describe() for p in self.layers]
        if self.value_residual:
            rows = [row + (f"; V mixed with L0[V heads 0-{p.n_v - 1}]" if p.layer and p.n_v else "")
                    for row, p in zip(rows, self.layers)]
        return "\n".join(rows)

    # ---- comparison ------------------------------------------------------------------------
    RUNTIME_FIELDS = ("attention", "scan_layers")  # how it computes, not what: free on resume

    def model_differences(self, other: "ModelConfig") -> list[str]:
        """Fields (other than RUNTIME_FIELDS) in which `other` describes a different model."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in self.RUNTIME_FIELDS and a[k] != b[k]]

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not isinstance(d["head_plan"], str):
            d["head_plan"] = [list(map(list, layer)) for layer in d["head_plan"]]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """A config from to_dict()'s dict; the model_config.json of older runs names head_plan
        `reflex`, which is taken as its alias."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names and key != "reflex":
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(names)}."
                raise ConfigError(f"unknown model config field '{key}'{hint}")
        return cls(**dict(d))


