"""What one bench run measures: model size, dtypes, repetitions, which contenders run."""
from __future__ import annotations

import dataclasses

from reflex_jax.errors import UsageError

from ..machine import default_dtypes

PRESETS = ("default", "quick", "smoke")


@dataclasses.dataclass
class BenchSettings:
    vocab_size: int = 50257
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 256
    batch: int = 8
    dtypes: tuple[str, ...] = ()      # compute dtypes, first = headline; () = default_dtypes()
    train_reps: int = 8
    peak_n: int = 2048                # square matmul size for the peak
    train: bool = True
    torch: bool = True
    torch_compile: bool = True
    gen: bool = True
    gen_prompts: tuple[int, ...] = (128, 512, 1024)
    gen_batches: tuple[int, ...] = (1, 8)
    gen_new_tokens: int = 64          # cached / HF: new tokens per call, prefill included
    gen_recompute_tokens: int = 2     # prefix re-run: new tokens timed (each is a full forward)
    gen_reps: int = 2
    hf: bool = True
    attention: str = "auto"           # model.attention of this project's models
    name: str = "default"

    @classmethod
    def preset(cls, name: str) -> "BenchSettings":
        if name == "default":
            return cls()
        if name == "quick":  # ~2-3 minutes on 2 quiet cores: one dtype, small model
            return cls(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=8, train_reps=3,
                       dtypes=default_dtypes()[:1], peak_n=1024, gen_prompts=(128, 512),
                       gen_batches=(1, 8), gen_new_tokens=32, gen_recompute_tokens=1, gen_reps=2,
                       name="quick")
        if name == "smoke":  # seconds; for the tests (no torch.compile)
            return cls(vocab_size=512, n_layer=2, n_head=4, n_embd=32, block_size=16, batch=2,
                       dtypes=("float32",), train_reps=1, peak_n=128, torch_compile=False,
                       gen_prompts=(16,), gen_batches=(2,), gen_new_tokens=4,
                       gen_recompute_tokens=1, gen_reps=1, name="smoke")
        raise UsageError(f"unknown bench preset {name!r}; use {', '.join(PRESETS[:-1])} or "
                         f"{PRESETS[-1]}.")

    def __post_init__(self):
        if not self.dtypes:
            self.dtypes = default_dtypes()

    def model_fields(self, reflex: str, dtype: str, **over) -> dict:
        """ModelConfig fields of the benchmarked architecture with schedule `reflex`."""
        d = dict(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                 n_head=self.n_head, n_embd=self.n_embd, norm="rmsnorm", mlp="swiglu", bias=True,
                 pos_emb="learned", tie_embeddings=True, dropout=0.0, dtype=dtype,
                 param_dtype="float32", head_plan=reflex, attention=self.attention)
        d.update(over)
        return d
