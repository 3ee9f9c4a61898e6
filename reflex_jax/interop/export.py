"""Export a run or params directory: `hf` (a trust_remote_code directory, interop/hf_export.py) or
`original` (the original PyTorch code's format, interop/original.py)."""
from __future__ import annotations

from typing import Optional

from ..checkpoint import load_params, read_checkpoint_meta
from ..errors import UsageError

KINDS = ("hf", "original")


def export_run(kind: str, run: str, out: str, *, step: Optional[int] = None) -> str:
    """Write `run`'s model (its best checkpoint, or `step`) to `out` as `kind`; a line saying what
    was written."""
    if kind not in KINDS:
        raise UsageError(f"export kind {kind!r} is unknown; use one of {', '.join(KINDS)}.")
    cfg, params = load_params(run, step=step)  # a LoRA run's: its adapters merged into the base
    meta = read_checkpoint_meta(run)
    from ..train.lora import read_reference
    ref = read_reference(run) if kind == "hf" else None
    if ref is not None:  # provenance: the base and the adapters' settings
        meta = {**meta, "lora": ref}
    if kind == "hf":
        from .hf_export import write_hf
        write_hf(cfg, params, out, tokenizer=meta.get("tokenizer"), template=meta.get("template"),
                 meta=meta)
        return (f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained("
                f"{out!r}, trust_remote_code=True)")
    from .original import write_original
    write_original(cfg, params, out)
    return f"wrote {out} in the original code's format (model.safetensors + config.json)"
