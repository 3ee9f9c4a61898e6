"""HF GPT-2 checkpoint -> params for any reflex `ModelConfig` (the mapping is in docs/convert.md).

    source = load_gpt2("ai-forever/rugpt3large_based_on_gpt2")   # or a local HF directory
    params, report = convert_gpt2(cfg, source, layers=[0, 4, 8, 12, 16, 20])
    print(report.table())

Reading the checkpoint is hf_source.py; what the conversion did, tensor by tensor, is report.py.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import ConvertError
from ..model import LayerPlan, ModelConfig
from ..model.route import ROUTE_INIT_LOGIT, route_init_logits
from .hf_source import Source, check_shapes, load_gpt2, matching_config
from .report import ParamWriter, Report, Row

# SwiGLU <- GELU: gate = ALPHA * c_fc, up = 0 * x + 1/ALPHA, down = c_proj, so the hidden unit is
# silu(ALPHA z) / ALPHA = z * sigmoid(ALPHA z), the sigmoid approximation of gelu(z) (Hendrycks & Gimpel).
SWIGLU_ALPHA = 1.702
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---- the mapping ------------------------------------------------------------------------------

def parse_layers(text: Optional[str]) -> Optional[list[int]]:
    """`'0,4,8'` -> [0, 4, 8]; None or '' -> None (target layer i <- source layer i)."""
    if text is None or not str(text).strip():
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConvertError(f"--layers={text!r} must be comma-separated source layer indices, e.g. "
                           "--layers 0,4,8,12.") from None


def pick_layers(cfg: ModelConfig, source: Source, layers: Optional[Sequence[int]]) -> list[int]:
    n_src = source.n_layer
    if layers is None:
        if cfg.n_layer > n_src:
            raise ConvertError(f"model.n_layer={cfg.n_layer} exceeds the source's {n_src} layers; lower "
                               f"n_layer or pass --layers with {cfg.n_layer} source indices "
                               "(repeats allowed).")
        return list(range(cfg.n_layer))
    layers = list(layers)
    if len(layers) != cfg.n_layer:
        raise ConvertError(f"--layers lists {len(layers)} source layers but model.n_layer="
                           f"{cfg.n_layer}; give exactly one source layer per target layer.")
    for j in layers:
        if not 0 <= j < n_src:
            raise ConvertError(f"--layers names source layer {j}, but the source has {n_src} layers "
                               f"(0..{n_src - 1}); pick indices in that range.")
    return layers


def _check_shapes(cfg: ModelConfig, source: Source) -> None:
    wte = source.tensor("wte.weight")
    if wte.shape[1] != cfg.n_embd:
        raise ConvertError(f"source tensor wte.weight has shape {tuple(wte.shape)} but the target needs "
                           f"{(cfg.vocab_size, cfg.n_embd)}: n_embd differs; set "
                           f"model.n_embd={wte.shape[1]}.")
    if wte.shape[0] != cfg.vocab_size:
        raise ConvertError(f"source tensor wte.weight has shape {tuple(wte.shape)} but the target needs "
                           f"{(cfg.vocab_size, cfg.n_embd)}: the vocabulary differs; set "
                           f"model.vocab_size={wte.shape[0]}.")
    if cfg.pos_emb == "learned":
        wpe = source.tensor("wpe.weight")
        if cfg.block_size > wpe.shape[0]:
            raise ConvertError(f"source tensor wpe.weight has shape {tuple(wpe.shape)} but "
                               f"model.block_size={cfg.block_size} needs {(cfg.block_size, cfg.n_embd)}; "
                               f"set model.block_size <= {wpe.shape[0]} (or use pos_emb='rope').")
    fc = source.tensor("h.0.mlp.c_fc.weight")
    if fc.shape[1] != cfg.hidden:
        raise ConvertError(f"source tensor h.0.mlp.c_fc.weight has shape {tuple(fc.shape)} but the target "
                           f"MLP needs {(cfg.n_embd, cfg.hidden)}; set model.mlp_hidden={fc.shape[1]}.")


def convert_gpt2(cfg: ModelConfig, source: Source, layers: Optional[Sequence[int]] = None,
                 seed: int = 0):
    """Map `source` onto `cfg`: returns (params, Report). Unmapped params are freshly initialised."""
    from flax import traverse_util
    from ..model import abstract_params
    check_shapes(source)   # the source against its own config.json, before any reshape
    _check_shapes(cfg, source)  # then the target against the source
    picked = pick_layers(cfg, source, layers)
    # Target shapes/dtypes without allocating; fresh values are only computed if something is new.
    flat = {".".join(k): v for k, v in traverse_util.flatten_dict(abstract_params(cfg)).items()}
    w = ParamWriter(source, flat)
    notes = _map_embeddings(w, cfg, source)
    for i, j in enumerate(picked):
        _map_block(w, cfg, source, f"h_{i}", f"h.{j}", cfg.layers[i])
    _map_norm(w, cfg, "ln_f", "ln_f")
    w.finish()
    notes += _conversion_notes(cfg, source) + _head_plan_notes(cfg)
    params = w.params(cfg, seed)
    return params, Report(source.describe(), cfg.schedule_table(), picked, w.rows, notes)


def _map_embeddings(w: ParamWriter, cfg: ModelConfig, source: Source) -> list[str]:
    """Token embedding, output head and learned positions; returns the notes they raise."""
    notes = []
    src_tied = bool(source.config.get("tie_word_embeddings", True))
    wte = source.tensor("wte.weight")
    w.put("wte", wte, "copied", "wte.weight")
    w.mark("wte.weight")
    if src_tied and "lm_head.weight" in source.tensors:
        w.mark("lm_head.weight")  # the same matrix as wte (tied); not a separate weight
    if not cfg.tie_embeddings:
        if not src_tied and "lm_head.weight" in source.tensors:
            w.put("lm_head", source.tensor("lm_head.weight").T, "copied", "lm_head.weight.T")
            w.mark("lm_head.weight")
        else:
            w.put("lm_head", wte.T, "copied", "wte.weight.T (source head is tied)")
    elif not src_tied and "lm_head.weight" in source.tensors:
        notes.append("the source has an untied lm_head but the target ties its head to wte; "
                     "lm_head.weight is dropped.")
    if cfg.pos_emb == "learned":
        wpe = source.tensor("wpe.weight")
        sliced = cfg.block_size < wpe.shape[0]
        w.put("wpe", wpe[:cfg.block_size], "sliced" if sliced else "copied",
              f"wpe.weight[:{cfg.block_size}]" if sliced else "wpe.weight")
        w.mark("wpe.weight", 0, 0, cfg.block_size)
    return notes


def _map_norm(w: ParamWriter, cfg: ModelConfig, target: str, src: str) -> None:
    w.put(f"{target}.scale", w.source.tensor(f"{src}.weight"), "copied", f"{src}.weight")
    w.mark(f"{src}.weight")
    if cfg.norm == "layernorm" and cfg.bias:
        w.put(f"{target}.bias", w.source.tensor(f"{src}.bias"), "copied", f"{src}.bias")
        w.mark(f"{src}.bias")


def _map_dense(w: ParamWriter, cfg: ModelConfig, target: str, src: str, kernel: np.ndarray,
               bias: np.ndarray, status: str, kdesc: str, bdesc: str) -> None:
    w.put(f"{target}.kernel", kernel, status, f"{src}.weight{kdesc}")
    if cfg.bias:
        w.put(f"{target}.bias", bias, status, f"{src}.bias{bdesc}")


def _map_block(w: ParamWriter, cfg: ModelConfig, source: Source, t: str, s: str, plan: LayerPlan):
    """Target block `t` (e.g. h_0) from source block `s` (e.g. h.4)."""
    _map_norm(w, cfg, f"{t}.ln_1", f"{s}.ln_1")
    _map_norm(w, cfg, f"{t}.ln_2", f"{s}.ln_2")
    _map_attention(w, cfg, source, t, s, plan)
    # MLP.
    fc, fcb = source.tensor(f"{s}.mlp.c_fc.weight"), source.tensor(f"{s}.mlp.c_fc.bias")
    pj, pjb = source.tensor(f"{s}.mlp.c_proj.weight"), source.tensor(f"{s}.mlp.c_proj.bias")
    if cfg.mlp == "gelu":
        _map_dense(w, cfg, f"{t}.mlp.fc", f"{s}.mlp.c_fc", fc, fcb, "copied", "", "")
        _map_dense(w, cfg, f"{t}.mlp.proj", f"{s}.mlp.c_proj", pj, pjb, "copied", "", "")
    else:
        a = SWIGLU_ALPHA
        _map_dense(w, cfg, f"{t}.mlp.gate", f"{s}.mlp.c_fc", a * fc, a * fcb, "copied",
                   f" x {a}", f" x {a}")
        if cfg.bias:
            w.put(f"{t}.mlp.up.kernel", np.zeros_like(fc), "constant", "zeros")
            w.put(f"{t}.mlp.up.bias", np.full_like(fcb, 1.0 / a), "constant", f"1/{a}")
        _map_dense(w, cfg, f"{t}.mlp.down", f"{s}.mlp.c_proj", pj, pjb, "copied", "", "")
    w.mark(f"{s}.mlp.c_fc.weight")
    w.mark(f"{s}.mlp.c_proj.weight")
    if cfg.bias:
        for b in ("attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
            w.mark(f"{s}.{b}")


def _map_attention(w: ParamWriter, cfg: ModelConfig, source: Source, t: str, s: str,
                   plan: LayerPlan) -> None:
    """HF Conv1D stores [in, out]; c_attn's out columns are [Q | K | V], each E wide. Q keeps its
    first n_query*D columns (all E unless `fewer:`) re-cut into the target's heads of size D, K
    its first n_k*D and V its first n_v*D columns (the heads the target layer computes: its self
    heads, none for a borrowing layer), and the output projection the kept query heads' rows."""
    E, D = cfg.n_embd, cfg.head_dim
    ca, cb = source.tensor(f"{s}.attn.c_attn.weight"), source.tensor(f"{s}.attn.c_attn.bias")
    q_what = "0:d" if plan.n_query == cfg.n_head else "0:n_query*D"
    k_what, v_what = (("d:d+n_self*D", "2d:2d+n_self*D") if plan.classic
                      else ("d:d+n_k*D", "2d:2d+n_v*D"))
    for name, lo, n, what in (("q", 0, plan.n_query, q_what), ("k", E, plan.n_k, k_what),
                              ("v", 2 * E, plan.n_v, v_what)):
        if not n:
            continue
        width = n * D
        _map_dense(w, cfg, f"{t}.attn.{name}", f"{s}.attn.c_attn",
                   ca[:, lo:lo + width].reshape(E, n, D), cb[lo:lo + width].reshape(n, D),
                   "copied" if width == E else "sliced", f"[:, {what}]", f"[{what}]")
        w.mark(f"{s}.attn.c_attn.weight", 1, lo, lo + width)
        if cfg.bias:
            w.mark(f"{s}.attn.c_attn.bias", 0, lo, lo + width)
    rows = plan.n_query * D
    cp, cpb = source.tensor(f"{s}.attn.c_proj.weight"), source.tensor(f"{s}.attn.c_proj.bias")
    _map_dense(w, cfg, f"{t}.attn.o", f"{s}.attn.c_proj", cp[:rows].reshape(plan.n_query, D, E),
               cpb, "copied" if rows == E else "sliced", "" if rows == E else f"[0:{rows}]", "")
    w.mark(f"{s}.attn.c_proj.weight", 0, 0, rows)
    if cfg.value_residual and plan.layer and plan.n_v:
        w.put(f"{t}.attn.value_mix", np.array([1.0, 0.0]), "constant", "1, 0 (the layer's own V)")
    if plan.routed:
        w.put(f"{t}.attn.route_logits", route_init_logits(plan), "constant",
              f"{ROUTE_INIT_LOGIT:g} at all's source, 0 elsewhere")


def _head_plan_notes(cfg: ModelConfig) -> list[str]:
    """What the target's head plan changes against the source's full multi-head attention."""
    notes, plans = [], cfg.layers
    borrowing = [p.layer for p in plans if not p.n_kv]
    if borrowing:
        notes.append(f"layers {', '.join(map(str, borrowing))} borrow every head's K/V from an "
                     "earlier layer and have no K/V projection: the K/V columns of the source "
                     "layers mapped onto them are dropped.")
    grouped = [p.layer for p in plans if p.n_self and p.n_kv != p.n_self]
    if grouped:
        notes.append(f"layers {', '.join(map(str, grouped))} share K/V heads between query heads "
                     "(GQA): each keeps the source's first n_kv K/V heads, so attention changes.")
    if any(p.n_query != cfg.n_head for p in plans):
        notes.append("layers with fewer query heads keep the source's first n_query Q heads and "
                     "their c_proj rows; the other heads are dropped.")
    if any(p.n_own_k for p in plans):
        notes.append("share-V cross heads take their own K from the source's K columns of the same "
                     "heads and read an earlier layer's V.")
    if any(p.routed for p in plans):
        notes.append(f"route: route_logits start as in training ({ROUTE_INIT_LOGIT:g} for the source "
                     "'all' gives each cross head, 0 for the others), so every routed head begins "
                     "as a mixture led by that source.")
    if cfg.value_residual:
        notes.append("value_residual: value_mix is set to (1, 0), so every layer starts with its own "
                     "V, as in the source.")
    return notes


def _conversion_notes(cfg: ModelConfig, source: Source) -> list[str]:
    """Where the target computes something other than the source did."""
    notes = []
    act = source.config.get("activation_function", "gelu_new")
    if cfg.mlp == "swiglu":
        notes.append(f"SwiGLU from GELU: gate = {SWIGLU_ALPHA} * c_fc, up = zero kernel + bias "
                     f"1/{SWIGLU_ALPHA}, down = c_proj; each hidden unit becomes z*sigmoid("
                     f"{SWIGLU_ALPHA}z) ~ gelu(z) (|error| <= 0.021 per unit).")
        if not cfg.bias:
            notes.append("model.bias=False: SwiGLU's up needs the constant bias 1/1.702, so up is "
                         "freshly initialised and the MLP function is NOT preserved; set "
                         "model.bias=True to keep it.")
    if act not in _GELU_TANH:
        notes.append(f"the source's activation is {act!r}; the target computes tanh-approximate gelu, "
                     "so MLP outputs differ slightly.")
    if cfg.norm == "rmsnorm":
        notes.append("rmsnorm: scale <- LayerNorm weight; LayerNorm biases and mean-centering dropped.")
    if not cfg.bias:
        notes.append("model.bias=False: every source bias is dropped.")
    if cfg.n_head != source.n_head:
        notes.append(f"model.n_head={cfg.n_head} differs from the source's {source.n_head}: Q/K/V "
                     f"columns are re-cut into heads of size {cfg.head_dim}, so attention patterns "
                     "change.")
    if cfg.pos_emb == "rope":
        notes.append("pos_emb='rope': the learned position table wpe.weight is dropped.")
    eps = float(source.config.get("layer_norm_epsilon", 1e-5))
    if abs(eps - cfg.norm_eps) > 1e-12:
        notes.append(f"model.norm_eps={cfg.norm_eps} differs from the source's {eps}.")
    for flag, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False)):
        if source.config.get(flag, not bad) == bad:
            notes.append(f"the source sets {flag}={bad}; the target always scales by 1/sqrt(D), so "
                         "attention differs.")
    return notes


def convert_to_dir(hf: str, cfg: ModelConfig, out: str, layers: Optional[Sequence[int]] = None,
                   seed: int = 0):
    """Load `hf`, convert it onto `cfg` and save a params directory at `out`. Returns the Report.
    (hf_import.convert_to_dir, which also reads Llama-family checkpoints.)"""
    from .hf_import import convert_to_dir as convert
    return convert(hf, cfg, out, layers, seed)


__all__ = ["ConvertError", "Source", "Report", "Row", "SWIGLU_ALPHA", "check_shapes", "load_gpt2",
           "matching_config", "parse_layers", "pick_layers", "convert_gpt2", "convert_to_dir"]
