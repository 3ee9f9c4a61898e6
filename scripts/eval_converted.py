"""Held-out loss of an HF GPT-2 and of its conversions (numbers in docs/convert.md).

    python scripts/eval_converted.py [--hf ../shared/data/models/ru-gpt2-tiny] \
        [--text ../shared/data/ru_text/turgenev]

The protocol is the one in models/README.md: the text files in sorted order, each followed by eos,
form one token stream; window j = 0..63 is tokens [257j, 257j + 256); the loss is the mean over
windows of the mean of the 255 next-token losses inside each window. Every converted model goes
through convert_to_dir + load_params, i.e. the same files training would start from.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from reflex_jax.checkpoint import load_params
from reflex_jax.data.tokenizer import load_tokenizer
from reflex_jax.interop.hf_gpt2 import convert_to_dir, load_gpt2, matching_config
from reflex_jax.model import Decoder, init_params

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                      "data")
N_WINDOWS, STRIDE, WINDOW = 64, 257, 256


def token_windows(tokenizer_dir: str, text_dir: str) -> np.ndarray:
    tok = load_tokenizer(tokenizer_dir)
    stream: list[int] = []
    for name in sorted(os.listdir(text_dir)):
        with open(os.path.join(text_dir, name), encoding="utf-8") as f:
            stream += tok.encode(f.read()) + [tok.eos_id]
    need = (N_WINDOWS - 1) * STRIDE + WINDOW
    if len(stream) < need:
        sys.exit(f"eval_converted: {text_dir!r} gives {len(stream)} tokens but {N_WINDOWS} windows "
                 f"need {need}; point --text at more held-out text.")
    return np.stack([np.asarray(stream[STRIDE * j:STRIDE * j + WINDOW]) for j in range(N_WINDOWS)])


def windows_loss(logits_fn, windows: np.ndarray, batch: int = 8) -> float:
    """Mean over windows of the mean next-token cross-entropy inside each window."""
    per_window = []
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        per_window.append(np.asarray(logits_fn(w)))
    return float(np.mean(np.concatenate(per_window)))


def jax_loss_fn(cfg, params):
    model = Decoder(cfg)

    @jax.jit
    def f(params, tokens):  # params as an argument: closed-over weights would be constant-folded
        logits = model.apply({"params": params}, tokens)[:, :-1]
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return nll.mean(-1)
    return lambda tokens: f(params, tokens)


def torch_loss_fn(hf_dir: str):
    import torch
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def f(tokens):
        t = torch.as_tensor(np.asarray(tokens))
        with torch.no_grad():
            logp = torch.log_softmax(model(t).logits[:, :-1].float(), -1)
            return (-logp.gather(-1, t[:, 1:, None])[..., 0]).mean(-1).numpy()
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", default=os.path.join(SHARED, "models", "ru-gpt2-tiny"))
    ap.add_argument("--text", default=os.path.join(SHARED, "ru_text", "turgenev"))
    args = ap.parse_args()
    for path in (args.hf, args.text):
        if not os.path.isdir(path):
            sys.exit(f"eval_converted: {path!r} does not exist; pass --hf/--text pointing at the "
                     "GPT-2 checkpoint and the held-out text directory.")
    hf, text = os.path.abspath(args.hf), os.path.abspath(args.text)
    windows = token_windows(hf, text)
    source = load_gpt2(hf)
    print(f"source: {source.describe()}")
    print(f"held-out: {text}, {N_WINDOWS} windows x {WINDOW} tokens\n")

    rows = []

    def record(name, cfg, note, fn):
        t0 = time.time()
        loss = windows_loss(fn, windows)
        arch = f"{cfg.norm}+{cfg.mlp}" if cfg else "layernorm+gelu"
        # the schedule table separates layers with '|', which would split a markdown cell
        schedule = cfg.schedule_table().replace(" | ", " / ") if cfg else "none"
        rows.append((name, arch, schedule, note, loss))
        print(f"  {name}, {arch}: {loss:.4f} ({time.time() - t0:.1f}s)", flush=True)

    torch_fn = torch_loss_fn(hf)
    record("original (torch, HF transformers)", None, "-", torch_fn)
    variants = [("converted vanilla", dict()),
                ("converted reflex all", dict(head_plan="all")),
                # recent:2,1 is invalid with 4 heads (layer 3 would want 2 of layer 2's single self
                # head); recent:1,1 is its 4-head analogue.
                ("converted reflex recent:1,1", dict(head_plan="recent:1,1")),
                ("converted vanilla", dict(mlp="swiglu")),
                ("converted vanilla", dict(norm="rmsnorm", mlp="swiglu")),
                ("converted reflex all", dict(head_plan="all", norm="rmsnorm", mlp="swiglu")),
                ("converted reflex recent:1,1", dict(head_plan="recent:1,1", norm="rmsnorm",
                                                        mlp="swiglu"))]
    max_delta = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(variants):
            out = os.path.join(tmp, str(i))
            report = convert_to_dir(hf, matching_config(source, **overrides), out)
            cfg, params = load_params(out)
            t = report.totals()
            note = f"{t['copied'] + t['sliced']:,} from source, {t['dropped']:,} dropped"
            record(name, cfg, note, jax_loss_fn(cfg, params))
            if not overrides:  # the vanilla conversion must be GPT-2 itself: compare logits too
                import torch
                from transformers import GPT2LMHeadModel
                ref = GPT2LMHeadModel.from_pretrained(hf, dtype=torch.float32).eval()
                with torch.no_grad():
                    want = ref(torch.as_tensor(windows[:4])).logits.numpy()
                got = np.asarray(Decoder(cfg).apply({"params": params}, windows[:4]))
                max_delta = float(np.abs(got - want).max())
    cfg = matching_config(source)
    record("random init", cfg, "all new", jax_loss_fn(cfg, init_params(cfg, jax.random.PRNGKey(0))))

    print("\n| model | norm+mlp | schedule (self+cross heads per layer) | params | "
          "held-out loss (nats) |")
    print("|---|---|---|---|---:|")
    for name, arch, schedule, note, loss in rows:
        print(f"| {name} | {arch} | {schedule} | {note} | {loss:.4f} |")
    print(f"\nconverted vanilla vs torch on windows 0-3: max |delta logits| = {max_delta:.2e}")


if __name__ == "__main__":
    main()
