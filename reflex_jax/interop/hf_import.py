"""`convert_weights.py --hf`: any accepted HF checkpoint -> a params directory, by config.json's
model_type: GPT-2 (hf_source.py, hf_gpt2.py) or the Llama family (hf_llama.py).

    report = convert_to_dir("Qwen/Qwen2-0.5B", None, "weights/qwen2")   # the source's own model
    report = convert_to_dir("./my-gpt2", cfg, "weights/reflex")         # onto any ModelConfig
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ..errors import ConvertError
from ..model import ModelConfig
from .hf_gpt2 import SWIGLU_ALPHA, convert_gpt2, matching_config
from .hf_llama import LLAMA_TYPES, LlamaSource, convert_llama, llama_source
from .hf_llama import equivalent_config as llama_config
from .hf_llama import source_config as llama_source_config
from .hf_source import Source, gpt2_source, open_checkpoint

GPT2_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "activation_function",
             "layer_norm_epsilon")


def load_hf(hf: str) -> Source:
    """The checkpoint at `hf` (a local directory or a hub id), read as its model_type says."""
    directory, hub_id, config = open_checkpoint(hf)
    kind = config.get("model_type", "gpt2")
    if kind == "gpt2":
        return gpt2_source(hf, directory, hub_id, config)
    if kind in LLAMA_TYPES:
        return llama_source(hf, directory, hub_id, config)
    raise ConvertError(f"--hf {hf!r} is a {kind!r} model (config.json model_type); convert_weights.py "
                       f"reads model_type gpt2, {', '.join(LLAMA_TYPES)} only, so convert a checkpoint "
                       "of one of those.")


def equivalent_config(source: Source, **overrides) -> ModelConfig:
    """The ModelConfig that computes exactly what `source` does (fields overridable)."""
    if isinstance(source, LlamaSource):
        return llama_config(source, **overrides)
    return matching_config(source, **overrides)


def convert_hf(cfg: ModelConfig, source: Source, layers: Optional[Sequence[int]] = None,
               seed: int = 0):
    """(params, Report): `source` mapped onto `cfg`."""
    if isinstance(source, LlamaSource):
        return convert_llama(cfg, source, layers, seed)
    return convert_gpt2(cfg, source, layers, seed)


def convert_to_dir(hf: str, cfg: Optional[ModelConfig], out: str,
                   layers: Optional[Sequence[int]] = None, seed: int = 0,
                   overrides: Optional[Mapping[str, Any]] = None):
    """Load `hf`, convert it onto `cfg` (None: `equivalent_config(source, **overrides)`) and save
    a params directory at `out`, which `load_params` reads back as (that config, params).
    Returns the Report."""
    from ..checkpoint import save_params
    source = load_hf(hf)
    if cfg is None:
        cfg = equivalent_config(source, **dict(overrides or {}))
    elif overrides:
        raise ConvertError("convert_to_dir takes either a target config or overrides of the "
                           "source's own config, not both; fold the overrides into the config.")
    params, report = convert_hf(cfg, source, layers, seed)
    llama = isinstance(source, LlamaSource)
    meta = {"source": source.hub_id or source.directory, "source_dir": source.directory,
            "source_files": source.files,
            "source_model_type": source.config.get("model_type", "gpt2"),
            "source_config": (llama_source_config(source) if llama
                              else {k: source.config.get(k) for k in GPT2_KEYS}),
            "layers": report.layers, "seed": seed, "totals": report.totals(), "notes": report.notes}
    if not llama and cfg.mlp == "swiglu":
        meta["swiglu_alpha"] = SWIGLU_ALPHA
    if source.tokenizer:
        meta["tokenizer"] = source.tokenizer
    save_params(out, cfg, params, meta)
    return report


__all__ = ["load_hf", "equivalent_config", "convert_hf", "convert_to_dir"]
