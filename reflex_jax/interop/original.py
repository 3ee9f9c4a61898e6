"""The original PyTorch Reflex code's checkpoints in and out (the mapping is in docs/convert.md).

    cfg, params, report = original_to_params("ckpt_2000.pt")       # or a PyTorchModelHubMixin dir
    convert_original_to_dir("user/reflex-gpt", "weights/original")  # or a hub id of one
    write_original(*load_params("runs/reflex"), "export/original")   # back to the original format

The original model is nanoGPT-shaped (nn.Linear weights [out, in], RMSNorm with eps 1e-6 and an
unused bias, learned positions, a tied head) with the `all` schedule, and its MLP is c_fc -> a
SwiGLU whose input projection is `act.proj` -> c_proj with no activation before `act.proj`, so
`act.proj o c_fc` folds exactly into SwiGLU's up and gate. The conversion is exact; so is the
export, for the models the original code can express.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..errors import ConvertError
from ..model import ModelConfig
from .hub import looks_like_hub_id, snapshot
from .report import ParamWriter, Report
from .safe_pickle import InertRecord, TensorRef, TorchArchive

SAFETENSORS, CONFIG = "model.safetensors", "config.json"
CONFIG_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")  # + dropout
NORM_EPS = 1e-6
# the target fields an import may override (how it computes, not what); the others come from
# the original checkpoint and its code
OVERRIDABLE = ("block_size", "dropout", "dtype", "param_dtype", "attention")


@dataclasses.dataclass
class OriginalSource:
    """An original checkpoint: its config fields and float32 tensors under nanoGPT names
    (`transformer.h.0.attn.c_attn.weight`, `lm_head.weight`)."""
    where: str                 # what the user passed
    path: str                  # the local directory or .pt file
    hub_id: Optional[str]
    fmt: str                   # "hub-mixin" | "ckpt"
    config: dict
    tensors: dict[str, np.ndarray]
    files: list[str]
    extra: dict = dataclasses.field(default_factory=dict)  # iter_num, best_val_loss of a ckpt

    @property
    def n_layer(self) -> int:
        return int(self.config["n_layer"])

    @property
    def n_head(self) -> int:
        return int(self.config["n_head"])

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ConvertError(f"the original checkpoint {self.where!r} has no tensor {name!r}; it "
                               "is not a complete state dict of the original model, so save it "
                               "again.")
        return self.tensors[name]

    def describe(self) -> str:
        c = self.config
        return (f"{self.where} ({', '.join(self.files)}; original Reflex code, {self.fmt}): "
                f"{c['n_layer']} layers x {c['n_head']} heads, n_embd {c['n_embd']}, "
                f"{c['block_size']} positions, vocab {c['vocab_size']}")


# ---- reading --------------------------------------------------------------------------------------

def _canonical_name(key: str) -> str:
    """nanoGPT names: `_orig_mod.` (torch.compile) stripped, `transformer.` where it belongs."""
    key = key[len("_orig_mod."):] if key.startswith("_orig_mod.") else key
    if key == "transformer.lm_head.weight":
        return "lm_head.weight"
    if re.match(r"(wte|wpe|ln_f|h\.\d+)\.", key):
        return "transformer." + key
    return key


def _read_config_fields(values: Mapping[str, Any], where: str) -> dict:
    """The dataclass fields the conversion needs, checked; names every missing one."""
    missing = [k for k in CONFIG_FIELDS if k not in values]
    if missing:
        raise ConvertError(f"{where} lacks the original config fields {', '.join(missing)} (it needs "
                           f"{', '.join(CONFIG_FIELDS)}); save the model with the notebook's "
                           "GPTConfig so they are recorded.")
    out = {k: values[k] for k in CONFIG_FIELDS}
    for k in CONFIG_FIELDS[:-1]:
        if not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < 1:
            raise ConvertError(f"{where} has {k}={out[k]!r}, which is not a positive integer; fix "
                               "the config.")
    if not isinstance(out["bias"], bool):
        raise ConvertError(f"{where} has bias={out['bias']!r}, which is not true or false; fix the "
                           "config.")
    dropout = values.get("dropout", 0.0)
    out["dropout"] = float(dropout) if isinstance(dropout, (int, float)) else 0.0
    return out


def _load_hub_dir(where: str, directory: str, hub_id: Optional[str]) -> OriginalSource:
    from safetensors import safe_open
    weights, cfg_path = os.path.join(directory, SAFETENSORS), os.path.join(directory, CONFIG)
    for path, what in ((weights, "the weights"), (cfg_path, "the GPTConfig fields")):
        if not os.path.isfile(path):
            raise ConvertError(f"{directory!r} has no {os.path.basename(path)} ({what}); point "
                               "--original at a PyTorchModelHubMixin directory (model.safetensors + "
                               "config.json) or at a notebook ckpt_*.pt file.")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            values = json.load(f)
    except ValueError as e:
        raise ConvertError(f"{cfg_path!r} is not valid JSON ({e}); write the GPTConfig fields "
                           "there as a JSON object.") from None
    if not isinstance(values, dict):
        raise ConvertError(f"{cfg_path!r} holds a JSON {type(values).__name__}, not an object of "
                           "GPTConfig fields; write them as a JSON object.")
    if isinstance(values.get("config"), dict):  # a mixin that nested the dataclass
        values = values["config"]
    config = _read_config_fields(values, f"{cfg_path!r}")
    try:
        with safe_open(weights, framework="np") as f:
            tensors = {_canonical_name(k): f.get_tensor(k).astype(np.float32) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors' own error types for a damaged file
        raise ConvertError(f"{weights!r} cannot be read as safetensors ({type(e).__name__}: "
                           f"{str(e)[:160]}); download or save it again.") from None
    return OriginalSource(where, directory, hub_id, "hub-mixin", config, tensors,
                          [SAFETENSORS, CONFIG])


def _check_ckpt(path: str, ckpt: Any) -> None:
    fix = "pass a notebook checkpoint saved as {\"model\": model.state_dict(), ...}."
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        held = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConvertError(f"{path!r} has no \"model\" state dict (it holds {held}); {fix}")
    if not isinstance(ckpt["model"], dict):
        what = getattr(ckpt["model"], "origin", type(ckpt["model"]).__name__)
        raise ConvertError(f"{path!r}: its \"model\" entry is a {what}, not a state dict of "
                           f"tensors; {fix}")


def _load_ckpt(where: str, path: str) -> OriginalSource:
    with TorchArchive(path) as archive:
        ckpt = archive.load()
        _check_ckpt(path, ckpt)
        values = {}
        record = ckpt.get("config")
        if isinstance(record, InertRecord):
            values.update(record.fields)
        elif isinstance(record, dict):
            values.update(record)
        if isinstance(ckpt.get("model_args"), dict):
            values.update(ckpt["model_args"])
        config = _read_config_fields(values, f"{path!r} (its model_args and config)")
        # only the model's tensors are read; the optimizer state stays unread in the zip
        tensors = {_canonical_name(k): v.array(k).astype(np.float32)
                   for k, v in ckpt["model"].items() if isinstance(v, TensorRef)}
        extra = {"iter_num": ckpt.get("iter_num")}
        loss = ckpt.get("best_val_loss")
        if isinstance(loss, TensorRef):
            loss = loss.array()
            loss = float(loss.reshape(-1)[0]) if loss.size == 1 else None
        extra["best_val_loss"] = loss
    return OriginalSource(where, path, None, "ckpt", config, tensors, [os.path.basename(path)],
                          {k: v for k, v in extra.items() if isinstance(v, (int, float))})


def load_original(src: str) -> OriginalSource:
    """A PyTorchModelHubMixin directory, a hub id of one, or a notebook `ckpt_*.pt` file."""
    path = os.path.abspath(os.path.expanduser(src))
    if os.path.isdir(path):
        source = _load_hub_dir(src, path, None)
    elif os.path.isfile(path):
        source = _load_ckpt(src, path)
    elif looks_like_hub_id(src, require_owner=True):
        directory = snapshot(src, [CONFIG, SAFETENSORS], "--original", "a local file or directory")
        source = _load_hub_dir(src, directory, src)
    else:
        raise ConvertError(f"--original {src!r} is neither an existing file or directory nor an HF "
                           "hub id (owner/name); fix the path.")
    _check_shapes(source)
    return source


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    V, P, d, L = (config[k] for k in ("vocab_size", "block_size", "n_embd", "n_layer"))
    out = {"transformer.wte.weight": (V, d), "lm_head.weight": (V, d),
           "transformer.wpe.weight": (P, d), "transformer.ln_f.weight": (d,),
           "transformer.ln_f.bias": (d,)}
    block = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
             "attn.c_attn.weight": (3 * d, d), "attn.c_attn.bias": (3 * d,),
             "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
             "mlp.c_fc.weight": (4 * d, d), "mlp.c_fc.bias": (4 * d,),
             "mlp.act.proj.weight": (8 * d, 4 * d), "mlp.act.proj.bias": (8 * d,),
             "mlp.c_proj.weight": (d, 4 * d), "mlp.c_proj.bias": (d,)}
    for i in range(L):
        out.update({f"transformer.h.{i}.{k}": v for k, v in block.items()})
    return out


def _check_shapes(source: OriginalSource) -> None:
    """Every known tensor has the shape the config implies, and no layer lies beyond n_layer."""
    c = source.config
    why = (f"the config (vocab_size={c['vocab_size']}, block_size={c['block_size']}, "
           f"n_embd={c['n_embd']})")
    expected = _expected_shapes(c)
    for name, value in source.tensors.items():
        m = re.match(r"transformer\.h\.(\d+)\.", name)
        if m and int(m.group(1)) >= source.n_layer:
            raise ConvertError(f"original tensor {name} belongs to layer {m.group(1)} but the config "
                               f"has n_layer={source.n_layer}; the checkpoint in {source.where!r} "
                               "does not match its config, so save it again.")
        if name in expected and tuple(value.shape) != expected[name]:
            raise ConvertError(f"original tensor {name} has shape {tuple(value.shape)} but {why} "
                               f"implies {expected[name]}; the checkpoint in {source.where!r} is "
                               "damaged or does not match its config, so save it again.")
    if "transformer.wte.weight" not in source.tensors and "lm_head.weight" not in source.tensors:
        source.tensor("transformer.wte.weight")  # names what is missing
    for i in range(source.n_layer):
        for k in ("ln_1.weight", "ln_2.weight", "attn.c_attn.weight", "attn.c_proj.weight",
                  "mlp.c_fc.weight", "mlp.act.proj.weight", "mlp.c_proj.weight"):
            source.tensor(f"transformer.h.{i}.{k}")
    source.tensor("transformer.wpe.weight")
    source.tensor("transformer.ln_f.weight")


# ---- the target config ---------------------------------------------------------------------------

_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.act.proj", "mlp.c_proj")


def _has_biases(source: OriginalSource) -> bool:
    """bias=True requires every linear bias; bias=False may still carry act.proj's (an
    nn.Linear with its default bias), and then the target keeps biases (the others zero)."""
    if source.config["bias"]:
        for i in range(source.n_layer):
            for lin in _LINEARS:
                source.tensor(f"transformer.h.{i}.{lin}.bias")
        return True
    return any(f"transformer.h.{i}.{lin}.bias" in source.tensors
               for i in range(source.n_layer) for lin in _LINEARS)


def target_config(source: OriginalSource, overrides: Optional[Mapping[str, Any]] = None):
    """The ModelConfig that computes exactly what the original does (runtime fields overridable)."""
    c = source.config
    if source.n_layer > source.n_head:
        raise ConvertError(
            f"the original model has n_layer={source.n_layer} > n_head={source.n_head}: its layer "
            f"{source.n_head} keeps no self head and exports a head it does not compute, which the "
            "'all' schedule here refuses (every layer needs a self head); only originals with "
            "n_layer <= n_head convert.")
    sizes = ModelConfig(vocab_size=c["vocab_size"], block_size=c["block_size"],
                        n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                        bias=_has_biases(source), dropout=c["dropout"], head_plan="none")
    base = original_config(sizes)
    overrides = dict(overrides or {})
    for name, value in overrides.items():
        if name not in OVERRIDABLE and name in base.to_dict() and value != getattr(base, name):
            raise ConvertError(f"model.{name}={value!r} cannot be overridden here: the original "
                               f"checkpoint fixes it to {getattr(base, name)!r}; drop the override "
                               "(convert first, then change the architecture in training).")
    cfg = ModelConfig.from_dict({**base.to_dict(), **overrides}) if overrides else base
    if cfg.block_size > base.block_size:
        raise ConvertError(f"model.block_size={cfg.block_size} exceeds the original's "
                           f"{base.block_size} learned positions; set model.block_size <= "
                           f"{base.block_size}.")
    return cfg


# ---- the mapping ------------------------------------------------------------------------------------

class _Writer:
    """ParamWriter plus the original's conventions: nn.Linear [out, in], biases zero-filled
    where the target has biases and the original has none."""

    def __init__(self, source: OriginalSource, cfg: ModelConfig, flat: dict):
        self.w, self.source, self.cfg = ParamWriter(source, flat), source, cfg

    def bias(self, name: str, size: int) -> tuple[np.ndarray, str]:
        """(values, description) of a linear's bias, zeros where the original has none."""
        if name in self.source.tensors:
            return self.source.tensors[name], name
        return np.zeros(size, np.float32), ZERO_BIAS

    def linear(self, target: str, status: str, kernel: np.ndarray, kdesc: str,
               bias: np.ndarray, bdesc: str) -> None:
        self.w.put(f"{target}.kernel", kernel, status, kdesc)
        if self.cfg.bias:
            self.w.put(f"{target}.bias", bias, "constant" if bdesc == ZERO_BIAS else status, bdesc)

    def mark(self, name: str, start: int = 0, stop: Optional[int] = None) -> None:
        if name in self.source.tensors:  # absent biases were zero-filled
            self.w.mark(name, 0, start, stop)


ZERO_BIAS = "zeros (the original has no bias here)"


def _rows(desc: str, rows: str) -> str:
    return desc if desc == ZERO_BIAS else f"{desc}[{rows}]"


def _map_attention(x: _Writer, t: str, s: str, n_self: int) -> None:
    """q from rows 0:d of c_attn, k/v from the first n_self heads' rows of d:2d and 2d:3d."""
    cfg = x.cfg
    E, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
    W = x.source.tensor(f"{s}.attn.c_attn.weight")
    b, bdesc = x.bias(f"{s}.attn.c_attn.bias", 3 * E)
    kv = n_self * D
    x.linear(f"{t}.attn.q", "copied", W[:E].T.reshape(E, H, D), f"{s}.attn.c_attn.weight[0:d].T",
             b[:E].reshape(H, D), _rows(bdesc, "0:d"))
    for name, lo in (("k", E), ("v", 2 * E)):
        rows = "d:d+n_self*D" if name == "k" else "2d:2d+n_self*D"
        x.linear(f"{t}.attn.{name}", "copied" if kv == E else "sliced",
                 W[lo:lo + kv].T.reshape(E, n_self, D), f"{s}.attn.c_attn.weight[{rows}].T",
                 b[lo:lo + kv].reshape(n_self, D), _rows(bdesc, rows))
    for lo, hi in ((0, E), (E, E + kv), (2 * E, 2 * E + kv)):  # the cross heads' rows stay unused
        x.mark(f"{s}.attn.c_attn.weight", lo, hi)
        x.mark(f"{s}.attn.c_attn.bias", lo, hi)
    P = x.source.tensor(f"{s}.attn.c_proj.weight")
    x.linear(f"{t}.attn.o", "copied", P.T.reshape(H, D, E), f"{s}.attn.c_proj.weight.T",
             *x.bias(f"{s}.attn.c_proj.bias", E))
    x.mark(f"{s}.attn.c_proj.weight")
    x.mark(f"{s}.attn.c_proj.bias")


def fold_swiglu(fc_w, fc_b, proj_w, proj_b, hidden: int):
    """(up kernel, up bias, gate kernel, gate bias) of act.proj o c_fc, in float64 -> float32:
    z = F x + b_fc, a = P z + b_p, up = a[:hidden], gate = a[hidden:]; kernels are [in, out]."""
    F, P = np.asarray(fc_w, np.float64), np.asarray(proj_w, np.float64)
    b_fc, b_p = np.asarray(fc_b, np.float64), np.asarray(proj_b, np.float64)
    out = []
    for part in (slice(0, hidden), slice(hidden, 2 * hidden)):
        out += [(P[part] @ F).T.astype(np.float32), (P[part] @ b_fc + b_p[part]).astype(np.float32)]
    return tuple(out)


def _map_mlp(x: _Writer, t: str, s: str) -> None:
    cfg, hid = x.cfg, x.cfg.hidden
    fc, pj = x.source.tensor(f"{s}.mlp.c_fc.weight"), x.source.tensor(f"{s}.mlp.act.proj.weight")
    fcb, _ = x.bias(f"{s}.mlp.c_fc.bias", fc.shape[0])
    pjb, _ = x.bias(f"{s}.mlp.act.proj.bias", pj.shape[0])
    up_k, up_b, gate_k, gate_b = fold_swiglu(fc, fcb, pj, pjb, hid)
    for name, k, b, half in (("up", up_k, up_b, "[:4d]"), ("gate", gate_k, gate_b, "[4d:]")):
        x.linear(f"{t}.mlp.{name}", "copied", k,
                 f"{s}.mlp.(act.proj.weight{half} @ c_fc.weight).T, folded", b,
                 f"{s}.mlp.act.proj.weight{half} @ c_fc.bias + act.proj.bias{half}, folded")
    down = x.source.tensor(f"{s}.mlp.c_proj.weight")
    x.linear(f"{t}.mlp.down", "copied", down.T, f"{s}.mlp.c_proj.weight.T",
             *x.bias(f"{s}.mlp.c_proj.bias", cfg.n_embd))
    for lin in ("c_fc", "act.proj", "c_proj"):
        x.mark(f"{s}.mlp.{lin}.weight")
        x.mark(f"{s}.mlp.{lin}.bias")


def _map_norm(x: _Writer, target: str, src: str) -> None:
    """RMSNorm: scale <- weight; the original's bias is never used, so it is dropped."""
    x.w.put(f"{target}.scale", x.source.tensor(f"{src}.weight"), "copied", f"{src}.weight")
    x.mark(f"{src}.weight")


def _map_embeddings(x: _Writer) -> None:
    src, cfg = x.source, x.cfg
    names = [n for n in ("transformer.wte.weight", "lm_head.weight") if n in src.tensors]
    if len(names) == 2 and not np.array_equal(src.tensors[names[0]], src.tensors[names[1]]):
        raise ConvertError(f"the original checkpoint {src.where!r} holds transformer.wte.weight and "
                           "lm_head.weight with different values, but the original model ties "
                           "them; save it again from the model itself.")
    x.w.put("wte", src.tensors[names[0]], "copied",
            f"{names[0]} (wte and lm_head are one tied matrix)")
    for n in names:
        x.mark(n)
    wpe = src.tensor("transformer.wpe.weight")
    sliced = cfg.block_size < wpe.shape[0]
    x.w.put("wpe", wpe[:cfg.block_size], "sliced" if sliced else "copied",
            f"transformer.wpe.weight[:{cfg.block_size}]" if sliced else "transformer.wpe.weight")
    x.mark("transformer.wpe.weight", 0, cfg.block_size)


def _notes(source: OriginalSource, cfg: ModelConfig) -> list[str]:
    notes = ["mlp: act.proj o c_fc folded exactly into SwiGLU up (first half of act.proj) and gate "
             "(second half); the original applies no activation between them.",
             "the RMSNorm biases and the cross heads' K/V rows of c_attn are never used by the "
             "original and are dropped (the function is unchanged).",
             f"schedule: the original's, {cfg.schedule_table()}; layer i's cross heads read the "
             "last self head of layers i-1, ..., 0, newest first."]
    if cfg.bias and not source.config["bias"]:
        notes.append("the original has bias=False but act.proj carries a bias, so the target has "
                     "biases and the other linears' are zero.")
    if cfg.block_size < source.config["block_size"]:
        notes.append(f"model.block_size={cfg.block_size}: positions beyond it are dropped.")
    return notes


def original_to_params(src: Union[str, OriginalSource],
                       overrides: Optional[Mapping[str, Any]] = None):
    """(ModelConfig, params, Report): the original model as this project's exact equivalent."""
    import jax.numpy as jnp
    from flax import traverse_util
    from ..model import abstract_params
    source = src if isinstance(src, OriginalSource) else load_original(src)
    cfg = target_config(source, overrides)
    flat = {".".join(k): v for k, v in traverse_util.flatten_dict(abstract_params(cfg)).items()}
    x = _Writer(source, cfg, flat)
    _map_embeddings(x)
    for i, plan in enumerate(cfg.layers):
        t, s = f"h_{i}", f"transformer.h.{i}"
        _map_norm(x, f"{t}.ln_1", f"{s}.ln_1")
        _map_norm(x, f"{t}.ln_2", f"{s}.ln_2")
        _map_attention(x, t, s, plan.n_self)
        _map_mlp(x, t, s)
    _map_norm(x, "ln_f", "transformer.ln_f")
    x.w.finish()
    for row in x.w.rows:  # h.{j}.* as in the HF table, so that the report groups over layers
        row.source = re.sub(r"^transformer\.", "", row.source)
    unwritten = sorted(set(flat) - x.w.written)
    if unwritten:  # the mapping covers every target parameter; anything else is a bug here
        raise RuntimeError(f"original mapping left {unwritten} unwritten")
    params = traverse_util.unflatten_dict({tuple(k.split(".")): jnp.asarray(v)
                                           for k, v in x.w.flat.items()})
    report = Report(source.describe(), cfg.schedule_table(), list(range(cfg.n_layer)), x.w.rows,
                    _notes(source, cfg))
    return cfg, params, report


def convert_original_to_dir(src: str, out: str,
                            overrides: Optional[Mapping[str, Any]] = None) -> Report:
    """Load the original checkpoint `src`, convert it and save a params directory at `out`."""
    from ..checkpoint import save_params
    source = load_original(src)
    cfg, params, report = original_to_params(source, overrides)
    meta = {"source": source.hub_id or source.path, "source_format": f"original {source.fmt}",
            "source_files": source.files, "source_config": source.config, **source.extra,
            "layers": report.layers, "totals": report.totals(), "notes": report.notes}
    save_params(out, cfg, params, meta)
    return report


# ---- the export ------------------------------------------------------------------------------------

def export_refusal(cfg: ModelConfig) -> Optional[str]:
    """Why `cfg` has no exact equivalent in the original code (one sentence), or None."""
    fix = "so it cannot be written in the original format; export it with --export hf instead."
    if cfg.n_layer > cfg.n_head:
        return (f"model.n_layer={cfg.n_layer} > n_head={cfg.n_head}: the original code's 'all' "
                f"schedule leaves layer {cfg.n_head} without a self head, {fix}")
    reference = original_config(cfg)
    if cfg.layers != reference.layers:
        field = "reflex_window" if cfg.head_plan == "all" else "head_plan"
        return (f"model.{field}={getattr(cfg, field)!r} gives the plan {cfg.schedule_table()}, but "
                f"the original code always runs {reference.schedule_table()} (every earlier layer, "
                f"newest first), {fix}")
    checks = (("norm", "the original normalises with RMSNorm"),
              ("norm_eps", f"the original's RMSNorm adds eps {NORM_EPS}"),
              ("mlp", "the original's MLP is c_fc -> SwiGLU(act.proj) -> c_proj"),
              ("hidden", f"the original's SwiGLU is 4*n_embd={4 * cfg.n_embd} wide"),
              ("pos_emb", "the original adds learned positions (wpe)"),
              ("tie_embeddings", "the original ties lm_head to wte"))
    for field, why in checks:
        if getattr(cfg, field) != getattr(reference, field):
            name = "mlp_hidden" if field == "hidden" else field
            return f"model.{name}={getattr(cfg, name)!r}: {why}, {fix}"
    for f in dataclasses.fields(cfg):  # anything else the original code has no counterpart for
        if f.name not in _EXPORT_FREE and getattr(cfg, f.name) != getattr(reference, f.name):
            return (f"model.{f.name}={getattr(cfg, f.name)!r}: the original code has no such "
                    f"feature (it runs {f.name}={getattr(reference, f.name)!r}), {fix}")
    return None


# fields an export keeps as they are (sizes, runtime) or checks above; bias=False exports as zeros
_EXPORT_FREE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden", "bias",
                "rope_theta", "dropout", "dtype", "param_dtype", "head_plan", "reflex_window",
                "reflex_min_self", "attention", "scan_layers")


def original_config(cfg: ModelConfig) -> ModelConfig:
    """The ModelConfig of the original code with `cfg`'s sizes and runtime fields."""
    return ModelConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, mlp_hidden=4 * cfg.n_embd,
                       norm="rmsnorm", norm_eps=NORM_EPS, mlp="swiglu", bias=cfg.bias,
                       pos_emb="learned", tie_embeddings=True, dropout=cfg.dropout,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, head_plan="all",
                       attention=cfg.attention)


def _original_block(cfg: ModelConfig, p: Mapping[str, Any], n_self: int) -> dict[str, np.ndarray]:
    """One layer's original tensors (without the `transformer.h.i.` prefix) from its params."""
    E, D, hid = cfg.n_embd, cfg.head_dim, cfg.hidden
    a, m = p["attn"], p["mlp"]
    bias = (lambda layer, shape: np.asarray(layer["bias"], np.float32).reshape(shape)) if cfg.bias \
        else (lambda layer, shape: np.zeros(shape, np.float32))
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    c_attn, c_attn_b = np.zeros((3 * E, E), np.float32), np.zeros(3 * E, np.float32)
    c_attn[:E], c_attn_b[:E] = f32(a["q"]["kernel"]).reshape(E, E).T, bias(a["q"], E)
    for name, lo in (("k", E), ("v", 2 * E)):  # the cross heads' rows stay zero: never read
        c_attn[lo:lo + n_self * D] = f32(a[name]["kernel"]).reshape(E, n_self * D).T
        c_attn_b[lo:lo + n_self * D] = bias(a[name], n_self * D)
    c_fc = np.zeros((hid, E), np.float32)
    c_fc[:E] = np.eye(E, dtype=np.float32)  # [I; 0]: z = (x, 0, ..., 0), so act.proj sees x
    proj = np.zeros((2 * hid, hid), np.float32)
    proj[:hid, :E], proj[hid:, :E] = f32(m["up"]["kernel"]).T, f32(m["gate"]["kernel"]).T
    return {
        "ln_1.weight": f32(p["ln_1"]["scale"]), "ln_1.bias": np.zeros(E, np.float32),
        "attn.c_attn.weight": c_attn, "attn.c_attn.bias": c_attn_b,
        "attn.c_proj.weight": f32(a["o"]["kernel"]).reshape(E, E).T,
        "attn.c_proj.bias": bias(a["o"], E),
        "ln_2.weight": f32(p["ln_2"]["scale"]), "ln_2.bias": np.zeros(E, np.float32),
        "mlp.c_fc.weight": c_fc, "mlp.c_fc.bias": np.zeros(hid, np.float32),
        "mlp.act.proj.weight": proj,
        "mlp.act.proj.bias": np.concatenate([bias(m["up"], hid), bias(m["gate"], hid)]),
        "mlp.c_proj.weight": f32(m["down"]["kernel"]).T, "mlp.c_proj.bias": bias(m["down"], E)}


def write_original(cfg: ModelConfig, params, out_dir: str) -> None:
    """Write `params` as the original code's PyTorchModelHubMixin directory: model.safetensors
    under its key names and config.json with its GPTConfig fields. Exact: the original computes
    the same logits. A model the original cannot express is refused in one sentence."""
    from safetensors.numpy import save_file
    from ..checkpoint import check_params_fit
    why = export_refusal(cfg)
    if why is not None:
        raise ConvertError(why)
    check_params_fit(cfg, params, "the params to export")
    wte = np.asarray(params["wte"], np.float32)
    tensors = {"transformer.wte.weight": wte, "lm_head.weight": wte.copy(),  # tied: both names
               "transformer.wpe.weight": np.asarray(params["wpe"], np.float32),
               "transformer.ln_f.weight": np.asarray(params["ln_f"]["scale"], np.float32),
               "transformer.ln_f.bias": np.zeros(cfg.n_embd, np.float32)}
    for i, plan in enumerate(cfg.layers):
        for k, v in _original_block(cfg, params[f"h_{i}"], plan.n_self).items():
            tensors[f"transformer.h.{i}.{k}"] = np.ascontiguousarray(v)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, SAFETENSORS), metadata={"format": "pt"})
    config = {"vocab_size": cfg.vocab_size, "block_size": cfg.block_size, "n_layer": cfg.n_layer,
              "n_head": cfg.n_head, "n_embd": cfg.n_embd, "dropout": cfg.dropout, "bias": True}
    with open(os.path.join(out_dir, CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
