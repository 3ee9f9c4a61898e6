"""Check `prepare` against a direct `transformers` tokenisation of the same rows.

    python scripts/check_token_count.py \
        --source ../shared/data/ru_instructions/ru_qa_combined.jsonl \
        --tokenizer ../shared/data/rugpt3_tokenizer

Prepares the .jsonl file into a temporary directory (timed), then tokenises every row independently:
bos + AutoTokenizer(template.format(**row))["input_ids"] + eos, and compares the total token count and
every row's ids (matched through {split}.source_rows.npy). Exits 1 on any difference.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

from reflex_jax.data import DEFAULT_TEMPLATE, TokenData, prepare


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="a .jsonl file with question/answer rows")
    p.add_argument("--tokenizer", required=True, help="a local HF tokenizer directory")
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        meta = prepare(args.source, args.tokenizer, out, template=args.template, progress=False)
        seconds = time.perf_counter() - t0
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        token_mib = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20
        data = TokenData.open(out)
        prepared = {}  # source row -> ids
        for split in data.splits:
            for r, (ids, _) in zip(data.source_rows(split), data.rows(split)):
                prepared[int(r)] = ids.astype(np.int64)

    from transformers import AutoTokenizer
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    direct, bad = {}, 0
    with open(args.source, encoding="utf-8") as f:
        for i, line in enumerate(l for l in f if l.strip()):
            row = json.loads(line)
            if not all(isinstance(row.get(k), str) and row[k].strip() for k in ("question", "answer")):
                bad += 1
                continue
            ids = tok(args.template.format(**row), add_special_tokens=False)["input_ids"]
            direct[i] = np.array([tok.bos_token_id, *ids, tok.eos_token_id])
    direct_seconds = time.perf_counter() - t0

    n_prepared = sum(len(v) for v in prepared.values())
    n_direct = sum(len(v) for v in direct.values())
    mismatched = [i for i in direct if i not in prepared or not np.array_equal(direct[i], prepared[i])]
    print(f"prepare: {len(prepared):,} rows, {n_prepared:,} tokens in {seconds:.2f}s "
          f"(meta: {sum(s['tokens'] for s in meta['splits'].values()):,}); peak RSS {peak_mib:.0f} MiB, "
          f"prepared files {token_mib:.1f} MiB")
    print(f"direct transformers: {len(direct):,} rows ({bad} unusable), {n_direct:,} tokens in "
          f"{direct_seconds:.2f}s (incl. tokenizer load)")
    print(f"rows whose ids differ: {len(mismatched)}")
    ok = n_prepared == n_direct and not mismatched and len(prepared) == len(direct)
    print("OK: identical" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
