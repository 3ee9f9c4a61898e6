"""Sample from a train.py run or a convert_weights.py directory with the KV-cache generator.

    python sample.py --run runs/reflex --prompt "Как дела?" --template instruct --max_new_tokens 64
    python sample.py --run weights/tiny --prompt_tokens 5,17,3 --print_tokens --max_new_tokens 8

temperature 0 (the default) is greedy. Every row stops at the tokenizer's eos, at a --stop token or
text, or after max_new_tokens.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

from ..errors import DataError, UsageError
from ..text import decode_user_text
from . import quiet_start, user_errors_as_status

PROG = "sample.py"
DEFAULT_NEW_TOKENS = 128
# Rows generated at once. Memory grows with it (the reference 6x8 model's KV cache is 49.5 MiB
# per row at its full 2048-token block, so 1.5 GiB for 32 rows), while 32 rows already keep
# the matmuls busy; a prompt file of thousands of lines runs in chunks of this many.
DEFAULT_BATCH_SIZE = 32


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (train.py) or converted params dir")
    p.add_argument("--step", type=int, default=None, help="restore this step (default: best)")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="without --step: best (lowest val loss) or latest checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt_file", help="text file, one prompt per non-empty line")
    p.add_argument("--prompt_tokens", action="append", default=[],
                   help="comma-separated token ids, e.g. 5,17,3 (repeat for a batch); no tokenizer")
    p.add_argument("--template", choices=("none", "instruct"), default="none",
                   help="instruct: bos + the run's training template up to the answer (default "
                        "'Вопрос: {question}\\n### Ответ: '); none: the raw text")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer named in meta.json")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"default: {DEFAULT_NEW_TOKENS}, or fewer if that would overrun the model's "
                        "block_size after the longest prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="most prompts generated at once (bounds memory; the output does not "
                        f"depend on it); default {DEFAULT_BATCH_SIZE}")
    p.add_argument("--stop", action="append", default=[],
                   help="stop a row at this token id (digits) or text (\\n is a newline); repeat for "
                        "several; the stop itself is not printed")
    p.add_argument("--print_tokens", action="store_true",
                   help="print 'prompt ids | new ids' (comma-separated), one line per row")
    return p.parse_args(argv)


def _check_floats(args) -> None:
    """nan passes every range check (nan < 0 is False) and then samples token 0 forever."""
    for flag in ("temperature", "top_p"):
        value = getattr(args, flag)
        if not math.isfinite(value):
            fix = ("0 for greedy or a positive temperature such as 0.8" if flag == "temperature"
                   else "a number in (0, 1], 1 for no nucleus filtering")
            raise UsageError(f"--{flag} {value} is not a finite number; pass {fix}.")


def _text_prompts(args) -> list[str]:
    many = len(args.prompt) > 1
    texts = [decode_user_text(t, f"--prompt #{k + 1}" if many else "--prompt")
             for k, t in enumerate(args.prompt)]
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise UsageError(f"--prompt_file {args.prompt_file!r} does not exist; pass a text file "
                             "with one prompt per line.")
        try:
            with open(args.prompt_file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise DataError(f"--prompt_file {args.prompt_file!r} cannot be read ({e.strerror}); "
                            "pass a readable text file.") from None
        text = decode_user_text(raw, f"--prompt_file {args.prompt_file!r}", DataError)
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as text mode reads
        texts += [line for line in lines if line.strip()]
    return texts


def _token_prompts(args) -> list[list[int]]:
    rows = []
    for spec in args.prompt_tokens:
        try:
            rows.append([int(t) for t in spec.replace(" ", "").split(",") if t])
        except ValueError:
            raise UsageError(f"--prompt_tokens {spec!r} is not a comma-separated list of token "
                             "ids; write it like 5,17,3.") from None
    return rows


def _stops(args, tok) -> tuple[list[int], list[str]]:
    """(stop token ids, stop texts): digits are ids; a text that is one token stops generation
    there, a longer one cuts the decoded text (generation runs on to max_new_tokens)."""
    ids, texts = [], []
    for value in args.stop:
        if value.strip().isdigit():
            ids.append(int(value))
            continue
        text = decode_user_text(value, f"--stop {value!r}")
        text = text.replace("\\n", "\n").replace("\\t", "\t")
        if not text:
            raise UsageError("--stop '' is empty; give a token id or a non-empty text.")
        if tok is None:
            raise UsageError(f"--stop {value!r} is text, which needs a tokenizer; pass --tokenizer "
                             "or give the stop as a token id.")
        encoded = tok.encode(text)
        if len(encoded) == 1:
            ids.append(encoded[0])
        else:
            texts.append(text)
    return ids, texts


def _cut_text(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def _instruct(tok, texts: list[str], template: str) -> list[list[int]]:
    """Each prompt's tokens as a question in the run's training template: bos and the template
    up to where the answer goes."""
    from ..data import prompt_tokens
    try:
        return [prompt_tokens(tok, t, template) for t in texts]
    except ValueError:
        raise UsageError(f"the run's template {template!r} has no {{question}} and {{answer}} to "
                         "fill; use --template none and write the whole prompt.") from None


def generate_lines(args) -> list[str]:
    """The lines sample.py prints."""
    from ..checkpoint import load_params, read_checkpoint_meta
    from ..data import DEFAULT_TEMPLATE, load_tokenizer
    from ..sampling import generate
    _check_floats(args)
    texts, token_rows = _text_prompts(args), _token_prompts(args)
    if texts and token_rows:
        raise UsageError("give text prompts (--prompt/--prompt_file) or --prompt_tokens, not both.")
    if not texts and not token_rows:
        raise UsageError("no prompt given; pass --prompt TEXT, --prompt_file FILE or "
                         "--prompt_tokens 5,17,3.")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size} must be at least 1 (the most prompts "
                         "generated at once).")
    if token_rows and args.template != "none":
        raise UsageError("--template applies to text prompts only; drop it when using "
                         "--prompt_tokens.")
    cfg, params = load_params(args.run, step=args.step, which=args.which)
    meta = read_checkpoint_meta(args.run)
    tok_name = args.tokenizer or meta.get("tokenizer")
    tok = None
    if tok_name:
        tok = load_tokenizer(tok_name)
        if tok.vocab_size > cfg.vocab_size:
            raise UsageError(f"tokenizer {tok_name!r} has {tok.vocab_size} tokens but the model in "
                             f"{args.run!r} has vocab_size={cfg.vocab_size}; pass the tokenizer the "
                             "model was trained with (--tokenizer).")
    elif texts:
        raise UsageError(f"{args.run!r} names no tokenizer in meta.json; pass --tokenizer (e.g. "
                         "bytes or a tokenizer directory) or give --prompt_tokens.")
    if texts and args.template == "instruct":
        token_rows = _instruct(tok, texts, meta.get("template") or DEFAULT_TEMPLATE)
    elif texts:
        token_rows = [tok.encode(t) for t in texts]
    stop_ids, stop_texts = _stops(args, tok)
    max_new = args.max_new_tokens
    if max_new is None:  # the default fits the block; an explicit value that does not is an error
        longest = max(len(p) for p in token_rows)
        max_new = min(DEFAULT_NEW_TOKENS, cfg.block_size - longest)
        if max_new < 1:
            raise UsageError(f"the longest prompt has {longest} tokens, which fills the model's "
                             f"block_size={cfg.block_size}; shorten it.")
    out = generate(cfg, params, token_rows, max_new_tokens=max_new,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, eos_id=tok.eos_id if tok else None,
                   pad_id=tok.pad_id if tok and tok.pad_id < cfg.vocab_size else 0,
                   batch_size=args.batch_size, stop_ids=stop_ids)
    if args.print_tokens or tok is None:
        return [f"{','.join(map(str, p))} | {','.join(map(str, o))}" for p, o in zip(token_rows, out)]
    lines = []
    for r, (p, o) in enumerate(zip(token_rows, out)):
        if r:
            lines.append("-" * 40)
        text, prompt = tok.decode(p + o), tok.decode(p)
        if stop_texts and text.startswith(prompt):  # look for the stop texts in the new text only
            text = prompt + _cut_text(text[len(prompt):], stop_texts)
        lines.append(text)
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    lines = []
    status = user_errors_as_status(PROG, lambda: lines.extend(generate_lines(args)))
    if status:
        return status
    if hasattr(sys.stdout, "reconfigure"):  # completions may be Cyrillic whatever the locale
        sys.stdout.reconfigure(encoding="utf-8")
    for line in lines:
        print(line)
    return 0


def run():
    """Console-script entry (reflex-sample)."""
    from ..malloc_tuning import tune_malloc
    tune_malloc()
    quiet_start()
    sys.exit(main())
