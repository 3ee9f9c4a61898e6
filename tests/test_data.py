"""Data preparation, the prepared format, and the loaders, on tiny data the tests make (no network)."""
import csv
import json
import os
import re

import numpy as np
import pytest

from reflex_jax import data as D
from reflex_jax.cli.data import main
from reflex_jax.data import (BatchLoader, ByteTokenizer, TokenData, Template, load_tokenizer, prepare,
                             prepare_task, token_dtype, val_batches)
from reflex_jax.data.encode import RowEncoder
from reflex_jax.data.templates import BadRow

from byte_bpe import train_byte_bpe

ROWS = [
    {"question": "Сколько будет 2 плюс 2?", "answer": "4"},
    {"question": "Столица Франции?", "answer": "Париж — столица Франции."},
    {"question": "Скажи {скобки}", "answer": "Вот: {answer} и {question}"},  # braces are data, not fields
    {"question": "Why?", "answer": "  Because  "},
    {"question": "Переведи: cat", "answer": "кот", "source": "x", "id": 7},
]


def render(row):
    return D.DEFAULT_TEMPLATE.format(question=row["question"], answer=row["answer"])


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def qa_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"question": f"Вопрос номер {i}: сколько {int(rng.integers(100))}?",
             "answer": "ответ " * int(rng.integers(1, 4)) + str(i)} for i in range(n)]


@pytest.fixture(scope="session")
def hf_bpe(tmp_path_factory):
    """A tiny byte-level BPE saved as a transformers tokenizer directory, with <pad>/<s>/</s>."""
    return train_byte_bpe([render(r) for r in ROWS + qa_rows(50)] * 5, 600,
                          str(tmp_path_factory.mktemp("tok") / "bpe"))


@pytest.fixture(scope="session")
def hf_big_vocab(tmp_path_factory):
    """A word-level tokenizer with 70,004 ids (> 65535): needs uint32 token files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    vocab.update({f"w{i}": i + 4 for i in range(70000)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = str(tmp_path_factory.mktemp("tok") / "big")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="[UNK]").save_pretrained(out)
    return out


def all_rows(d, split="train"):
    return [(ids.tolist(), m.tolist()) for ids, m in d.rows(split)]


# ------------------------------------------------------------------------------ template, tokenising

def test_byte_roundtrip_and_answer_mask(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    meta = prepare(src, "bytes", str(tmp_path / "out"), val_fraction=0, progress=False)
    d = TokenData.open(str(tmp_path / "out"))
    assert isinstance(d.tokenizer(), ByteTokenizer) and meta["tokenizer"] == "bytes"
    assert d.splits == ["train"] and meta["splits"]["train"]["rows"] == len(ROWS)
    b = ByteTokenizer()
    for (ids, mask), row in zip(all_rows(d), ROWS):
        assert ids == [b.bos_id] + list(render(row).encode()) + [b.eos_id]
        assert b.decode(ids) == render(row)
        # the answer mask covers exactly the answer's tokens and the closing eos
        assert [t for t, m in zip(ids, mask) if m] == list(row["answer"].encode()) + [b.eos_id]
        assert mask[-len(row["answer"].encode()) - 1:] == [1] * (len(row["answer"].encode()) + 1)
    assert list(d.source_rows("train")) == list(range(len(ROWS)))
    assert meta["splits"]["train"]["answer_tokens"] == sum(len(r["answer"].encode()) + 1 for r in ROWS)


def test_hf_tokenizer_roundtrip_equals_direct_tokenisation(tmp_path, hf_bpe):
    from transformers import AutoTokenizer
    rows = ROWS + qa_rows(20)
    src = write_jsonl(tmp_path / "qa.jsonl", rows)
    meta = prepare(src, hf_bpe, str(tmp_path / "out"), val_fraction=0, progress=False)
    d = TokenData.open(str(tmp_path / "out"))
    tok = AutoTokenizer.from_pretrained(hf_bpe)
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (1, 2, 0)
    assert meta["tokenizer"] == os.path.abspath(hf_bpe) and d.tokenizer().vocab_size == meta["vocab_size"]
    merged_boundary = 0
    for (ids, mask), row in zip(all_rows(d), rows):
        direct = tok(render(row), add_special_tokens=False)["input_ids"]
        assert ids == [1] + direct + [2]
        answer_ids = [t for t, m in zip(ids, mask) if m]
        assert answer_ids[-1] == 2 and mask[0] == 0
        # answer tokens are a contiguous tail, decode to the answer (a leading space may be merged in)
        first = mask.index(1)
        assert all(mask[first:]) and not any(mask[:first])
        assert tok.decode(answer_ids[:-1]) in (row["answer"], " " + row["answer"])
        prompt = tok.decode(ids[1:first])
        merged_boundary += prompt != render(row)[:-len(row["answer"])]
        assert render(row).startswith(prompt)
    assert merged_boundary > 0  # the BPE merged "Ответ: " 's space into the answer for some rows


def test_generic_encoder_path_matches_backend(hf_bpe):
    tok = load_tokenizer(hf_bpe)

    class NoBackend:  # a tokenizer with only the public interface
        encode_batch = staticmethod(tok.encode_batch)

    texts = [render(r) for r in ROWS + qa_rows(10)]
    spans = [[(len(t) - len(r["answer"]), len(t))] for t, r in zip(texts, ROWS + qa_rows(10))]
    # and several spans a row (a multi-query recall row's values), ending before the text does
    from reflex_jax.data.tasks import get_task
    mq = get_task("kv_recall").rows(6, 0, n_pairs=5, queries=4)
    texts += [render(r) for r in mq]
    spans += [[(len(t) - len(r["answer"]) + a, len(t) - len(r["answer"]) + b) for a, b in r["answer_spans"]]
              for t, r in zip(texts[-len(mq):], mq)]
    fast = RowEncoder(tok).encode(texts, spans)
    slow = RowEncoder(NoBackend()).encode(texts, spans)
    for (a, ma), (b, mb) in zip(fast, slow):
        assert a.tolist() == b.tolist() and ma.tolist() == mb.tolist()
    for (ids, mask), r in zip(fast[-len(mq):], mq):  # every value, and no word of the queries
        pieces = [tok.decode([i]) for i in ids[mask].tolist()]
        values = "".join(r["answer"][a:b] for a, b in r["answer_spans"])
        assert "".join(c for p in pieces for c in p if c.isdigit()) == values
        assert not any(c.isalpha() for p in pieces for c in p), pieces


def test_template_fields_and_errors():
    t = Template("Q: {instruction}\n{context}\nA: {output}",
                 ["instruction=prompt", "context", "output=response"])
    assert t.answer_field == "output"
    values = t.values({"prompt": "p", "context": "c", "response": "r"})
    assert t.prompt(values) == "Q: p\nc\nA: "
    with pytest.raises(BadRow, match=r"missing_field\(response\)"):
        t.values({"prompt": "p", "context": "c"})
    for template, fields, message in [
        ("{answer} tail", None, "must end with the answer placeholder"),
        ("Q: {question}", ["question", "answer"], "do not match the template placeholders"),
        ("{0} {answer}", None, "plain named field"),
        ("{question!r} {answer}", None, "plain named field"),
        ("{question {answer}", None, "not a valid format string"),
        ("{answer}{answer}", None, "twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            Template(template, fields)


# ------------------------------------------------------------------------------------ bad rows, long rows

BAD_LINES = ['{"question": "broken", "answer": ', "not json at all",
             '{"question": "q only"}', '{"question": "", "answer": "a"}',
             '{"question": "q", "answer": "   "}', '{"question": "q", "answer": 42}',
             '{"question": null, "answer": "a"}', '[1, 2]', "", "   "]


@pytest.mark.parametrize("policy", ["keep", "split", "drop"])
def test_bad_and_long_rows_are_counted(tmp_path, capsys, policy):
    long_row = {"question": "long", "answer": "я" * 100}  # 237 byte tokens; ROWS are <= 108
    src = write_jsonl(tmp_path / "qa.jsonl", ROWS + [long_row], BAD_LINES)
    meta = prepare(src, "bytes", str(tmp_path / policy), val_fraction=0, long_rows=policy,
                   max_tokens=110, progress=False)
    expected = {"malformed_json": 2, "missing_field(answer)": 1, "empty_field(question)": 1,
                "empty_field(answer)": 1, "non_string_field(answer)": 1, "missing_field(question)": 1,
                "not_an_object": 1}
    if policy == "drop":
        expected["too_long"] = 1
    assert meta["skipped"] == expected
    assert meta["source_rows"] == len(ROWS) + 1 + 8  # blank lines are not rows
    assert meta["long_rows"] == {"policy": policy, "max_tokens": 110, "rows": 1}
    d = TokenData.open(str(tmp_path / policy))
    rows = all_rows(d)
    full = [257] + list(render(long_row).encode()) + [258]
    if policy == "keep":
        assert len(rows) == len(ROWS) + 1 and rows[-1][0] == full
    elif policy == "drop":
        assert len(rows) == len(ROWS) and all(len(ids) <= 110 for ids, _ in rows)
    else:  # pieces of <= max_tokens that concatenate to the row, each a row of the same source row
        pieces = rows[len(ROWS):]
        assert [len(p[0]) for p in pieces] == [110, 110, 17]
        assert sum((p[0] for p in pieces), []) == full
        assert list(d.source_rows("train")[len(ROWS):]) == [len(ROWS)] * 3
    # one summary line on stdout naming every reason
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0] == meta["summary"]
    assert "malformed_json 2" in out[0] and "non_string_field(answer) 1" in out[0]
    done = {'keep': 'kept', 'split': 'split', 'drop': 'dropped'}[policy]
    assert f"1 rows over 110 tokens ({done})" in out[0]
    # kept and split rows are reached whole by the loader's windows; only a dropped row is lost
    dropped = len(long_row["answer"].encode()) + 1 if policy == "drop" else 0
    assert meta["row_lengths"] == {"longest": len(full), "dropped_answer_tokens": dropped}
    answers = sum(len(r["answer"].encode()) + 1 for r in ROWS) + len(long_row["answer"].encode()) + 1
    assert f"longest row {len(full)} tokens; answer tokens out of reach: " + (
        f"{dropped} of {answers} ({100 * dropped / answers:.1f}%)" if dropped else "none") in out[0]
    reach = D.window_reach(d, "train", 109)
    assert reach["unreachable_answer_tokens"] == 0 and reach["long_rows"] == (policy != "drop")
    summary = BatchLoader(d, "train", 2, 109, 0).summary()
    assert summary.endswith(f"; prepare dropped 1 rows over 110 tokens, with {dropped} answer tokens"
                            if policy == "drop" else "answer tokens out of reach: 0 of "
                            f"{answers:,} (0.0%)")


def test_bad_utf8_line_is_counted(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, ROWS[:2])
    with open(path, "ab") as f:
        f.write(b'{"question": "\xff\xfe", "answer": "a"}\n')
    meta = prepare(str(path), "bytes", str(tmp_path / "out"), val_fraction=0, progress=False,
                   verbose=False)
    assert meta["skipped"] == {"not_utf8": 1} and meta["splits"]["train"]["rows"] == 2


# ------------------------------------------------------------------------------------------ dtypes

def test_token_dtype_choice(tmp_path, hf_big_vocab):
    assert token_dtype(258) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    small = prepare(write_jsonl(tmp_path / "a.jsonl", ROWS), "bytes", str(tmp_path / "small"),
                    val_fraction=0, progress=False, verbose=False)
    assert small["dtype"] == "uint16"
    assert os.path.getsize(tmp_path / "small" / "train.tokens.bin") == 2 * small["splits"]["train"]["tokens"]
    rows = [{"question": "w1 w70 w65535", "answer": "w65536 w69999"}, {"question": "w3", "answer": "w4"}]
    big = prepare(write_jsonl(tmp_path / "b.jsonl", rows), hf_big_vocab, str(tmp_path / "big"),
                  template="{question} {answer}", val_fraction=0, progress=False, verbose=False)
    assert big["vocab_size"] == 70004 and big["dtype"] == "uint32"
    d = TokenData.open(str(tmp_path / "big"))
    assert os.path.getsize(tmp_path / "big" / "train.tokens.bin") == 4 * big["splits"]["train"]["tokens"]
    ids, mask = d.rows("train", 0, 1)[0]
    assert ids.tolist() == [1, 5, 74, 65539, 65540, 70003, 2]  # ids above 65535 survive
    assert mask.tolist() == [0, 0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------------------------------ sources

def test_all_row_formats_give_the_same_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"instruction": r["question"], "output": r["answer"]} for r in ROWS]
    paths = {"jsonl": write_jsonl(tmp_path / "r.jsonl", rows)}
    (tmp_path / "l.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps({"version": 1, "data": rows}), encoding="utf-8")
    with open(tmp_path / "r.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["instruction", "output"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    paths.update(json=str(tmp_path / "l.json"), json_data=str(tmp_path / "d.json"),
                 csv=str(tmp_path / "r.csv"), parquet=str(tmp_path / "r.parquet"))
    streams = {}
    for name, path in paths.items():
        meta = prepare(path, "bytes", str(tmp_path / name), fields=["question=instruction",
                       "answer=output"], val_fraction=0, progress=False, verbose=False)
        assert meta["fields"] == {"question": "instruction", "answer": "output"}
        assert meta["source"]["files"][0]["sha256"] and meta["skipped"] == {}
        streams[name] = np.asarray(TokenData.open(str(tmp_path / name)).split("train")).tolist()
    expected = sum(([257] + list(render(r).encode()) + [258] for r in ROWS), [])
    assert all(s == expected for s in streams.values()), {k: len(v) for k, v in streams.items()}
    # several files: one stream in order, source rows counted across files
    meta = prepare([paths["jsonl"], paths["csv"]], "bytes", str(tmp_path / "two"),
                   fields="question=instruction,answer=output".split(","), val_fraction=0,
                   progress=False, verbose=False)
    assert meta["splits"]["train"]["rows"] == 2 * len(ROWS)
    assert list(TokenData.open(str(tmp_path / "two")).source_rows("train")) == list(range(10))


def test_txt_documents(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("Первый документ.\nВторая строка.", encoding="utf-8")
    (docs / "sub" / "b.txt").write_text("Второй документ " * 20, encoding="utf-8")
    (docs / "empty.txt").write_text("  \n", encoding="utf-8")
    (docs / "notes.md").write_text("ignored", encoding="utf-8")
    meta = prepare(str(docs), "bytes", str(tmp_path / "out"), val_fraction=0, long_rows="drop",
                   max_tokens=10, progress=False, verbose=False)
    assert meta["kind"] == "text" and meta["template"] is None and meta["long_rows"] is None
    assert meta["skipped"] == {"empty_document": 1}  # long docs are streamed, never dropped
    d = TokenData.open(str(tmp_path / "out"))
    texts = [(docs / "a.txt").read_text(encoding="utf-8"),
             (docs / "sub" / "b.txt").read_text(encoding="utf-8")]
    for (ids, mask), text in zip(all_rows(d), texts):
        assert ids == [257] + list(text.encode()) + [258] and all(mask)


# ------------------------------------------------------------------------------------------ errors

def test_user_mistakes_give_one_clear_sentence(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    (tmp_path / "data.xml").write_text("<x/>")
    (tmp_path / "t.txt").write_text("text")
    (tmp_path / "nodocs").mkdir()
    out = str(tmp_path / "out")
    cases = [
        (dict(source=str(tmp_path / "data.xml")), ValueError, "unknown file type '.xml'"),
        (dict(source=str(tmp_path / "missing.jsonl")), FileNotFoundError, "does not exist"),
        (dict(source="./missing_dir/x"), FileNotFoundError, "does not exist"),
        (dict(source=str(tmp_path / "nodocs")), ValueError, "holds no .txt files"),
        (dict(source=[src, str(tmp_path / "t.txt")]), ValueError, "cannot mix .txt documents"),
        (dict(source=[]), ValueError, "no source given"),
        (dict(source=src, fields=["q", "a"]), ValueError, "no usable rows"),
        (dict(source=src, long_rows="split"), ValueError, "needs max_tokens"),
        (dict(source=src, long_rows="truncate"), ValueError, "is not one of keep, split, drop"),
        (dict(source=src, val_fraction=1.5), ValueError, r"must be in \[0, 1\)"),
        (dict(source=write_jsonl(tmp_path / "one.jsonl", ROWS[:1])), ValueError, "too few for a validation"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message) as info:
            prepare(kwargs.pop("source"), "bytes", out, progress=False, verbose=False,
                    **{"template": "Q {q} A {a}", **kwargs} if "fields" in kwargs else kwargs)
        assert str(info.value).count("; ") <= 2 and "\n" not in str(info.value)
    (tmp_path / "bad.json").write_text('{"a": 1', encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid UTF-8 JSON"):
        prepare(str(tmp_path / "bad.json"), "bytes", out, progress=False)
    (tmp_path / "obj.json").write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="holds no list of rows"):
        prepare(str(tmp_path / "obj.json"), "bytes", out, progress=False)
    assert not os.path.exists(out) or "meta.json" not in os.listdir(out)  # failures publish nothing
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]            # and leave no temp dirs
    with pytest.raises(FileNotFoundError, match="does not exist; prepare it with"):
        TokenData.open(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not a prepared data directory"):
        TokenData.open(str(tmp_path / "nodocs"))


def test_hub_id_that_cannot_load_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"is not a local path and could not be loaded as HF dataset "
                                         r"'nobody-here/no-such-set' split 'train' .*pass local"):
        prepare("nobody-here/no-such-set", "bytes", str(tmp_path / "out"), progress=False)


def test_cli_prepare_info_and_errors(tmp_path, capsys):
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    out = str(tmp_path / "out")
    assert main(["prepare", "--source", src, "--tokenizer", "bytes", "--out", out, "--val_fraction",
                 "0.1", "--template", "Q: {question}\\nA: {answer}", "--no_progress"]) == 0
    meta = TokenData.open(out).meta
    assert meta["template"] == "Q: {question}\nA: {answer}"
    assert meta["splits"]["val"]["rows"] == 4 and meta["splits"]["train"]["rows"] == 36
    assert main(["info", out]) == 0
    assert meta["summary"] in capsys.readouterr().out
    assert main(["prepare", "--source", str(tmp_path / "nope.csv"), "--tokenizer", "bytes",
                 "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (len(err) == 1 and err[0].startswith("reflex_jax.data: error: source")
            and "does not exist" in err[0])
    assert main(["task", "--task", "nope", "--out", out]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ splits

def test_val_split_is_seeded_disjoint_and_complete(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows(200))
    got = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        meta = prepare(src, "bytes", str(tmp_path / name), val_fraction=0.05, seed=seed,
                       progress=False, verbose=False)
        d = TokenData.open(str(tmp_path / name))
        train, val = set(d.source_rows("train").tolist()), set(d.source_rows("val").tolist())
        assert len(val) == 10 and not train & val and train | val == set(range(200))
        assert meta["splits"]["val"]["rows"] == 10
        got[name] = sorted(val)
        # val rows hold exactly their source row's tokens
        for r, (ids, _) in zip(d.source_rows("val"), d.rows("val")):
            assert ids.tolist() == [257] + list(render(qa_rows(200)[r]).encode()) + [258]
    assert got["a"] == got["b"] and got["a"] != got["c"]


def test_val_source_is_the_whole_val_split(tmp_path, capsys):
    # e.g. one author held out: every document of --val_source is val, every one of --source train
    train_docs, val_docs = tmp_path / "train", tmp_path / "held_out"
    train_docs.mkdir(), val_docs.mkdir()
    texts = {train_docs / "a.txt": "Первый.", train_docs / "b.txt": "Второй " * 5,
             val_docs / "c.txt": "Третий!"}
    for path, text in texts.items():
        path.write_text(text, encoding="utf-8")
    out = str(tmp_path / "out")
    meta = prepare(str(train_docs), "bytes", out, val_source=str(val_docs), progress=False, verbose=False)
    d = TokenData.open(out)
    def as_ids(t):
        return [257] + list(t.encode()) + [258]
    assert [ids.tolist() for ids, _ in d.rows("train")] == [as_ids("Первый."), as_ids("Второй " * 5)]
    assert [ids.tolist() for ids, _ in d.rows("val")] == [as_ids("Третий!")]
    assert meta["val_fraction"] is None and meta["seed"] is None
    assert [f["path"] for f in meta["val_source"]["files"]] == [str(val_docs / "c.txt")]
    assert meta["splits"]["val"] == {"rows": 1, "tokens": 15, "answer_tokens": 15, "max_id": 258}
    # reused when unchanged; another held-out source is another preparation
    assert prepare(str(train_docs), "bytes", out, val_source=str(val_docs), progress=False) == meta
    assert "up to date" in capsys.readouterr().out
    main(["prepare", "--source", str(train_docs), "--val_source", str(val_docs), "--tokenizer", "bytes",
          "--out", str(tmp_path / "cli"), "--no_progress"])
    assert D.data_fingerprint(str(tmp_path / "cli")) == D.data_fingerprint(out)
    fp = D.data_fingerprint(out)
    with pytest.raises(ValueError, match=r"other options \(val_source differs\)"):
        prepare(str(train_docs), "bytes", out, val_source=str(train_docs / "a.txt"), progress=False)
    # without val_source the fingerprint keeps its earlier form (runs on such data resume)
    plain = prepare(str(train_docs), "bytes", str(tmp_path / "plain"), val_fraction=0, progress=False,
                    verbose=False)
    assert "val_source" not in plain and D.data_fingerprint(str(tmp_path / "plain")) != fp
    rows = write_jsonl(tmp_path / "qa.jsonl", qa_rows(3))
    with pytest.raises(ValueError, match=r"^the val source .* holds rows but the source .* holds text; "
                                         r"give a val source of the same kind"):
        prepare(str(train_docs), "bytes", str(tmp_path / "mixed"), val_source=rows, progress=False)


def test_reprepare_replaces_stale_splits(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows(30))
    out = str(tmp_path / "out")
    prepare(src, "bytes", out, val_fraction=0.2, progress=False, verbose=False)
    assert os.path.exists(os.path.join(out, "val.tokens.bin"))
    with pytest.raises(ValueError, match=r"already holds data prepared from other options "
                                         r"\(val_fraction differs\); pass --overwrite"):
        prepare(src, "bytes", out, val_fraction=0, progress=False, verbose=False)
    assert TokenData.open(out).splits == ["train", "val"]  # refused: untouched
    prepare(src, "bytes", out, val_fraction=0, overwrite=True, progress=False, verbose=False)
    assert not os.path.exists(os.path.join(out, "val.tokens.bin"))
    d = TokenData.open(out)
    assert d.splits == ["train"] and d.meta["splits"]["train"]["rows"] == 30
    with pytest.raises(ValueError, match="split 'val' is not in"):
        val_batches(d, 2, 16, 1)
    with open(os.path.join(out, "train.tokens.bin"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="wrong size"):
        TokenData.open(out)


# ------------------------------------------------------------------------------------------ loader

@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    src = write_jsonl(root / "qa.jsonl", qa_rows(300))
    prepare(src, "bytes", str(root / "out"), val_fraction=0.1, progress=False, verbose=False)
    return str(root / "out")


def test_loader_is_a_pure_function_of_seed_and_step(qa_dir):
    d = TokenData.open(qa_dir)
    loader = BatchLoader(d, "train", 8, 64, seed=3)
    b0, b0_again, b1 = loader.batch(0), BatchLoader(d, "train", 8, 64, seed=3).batch(0), loader.batch(1)
    assert b0["tokens"].shape == b0["mask"].shape == (8, 65)
    assert b0["tokens"].dtype == np.int32 and b0["mask"].dtype == np.float32
    assert np.array_equal(b0["tokens"], b0_again["tokens"]) and np.array_equal(b0["mask"], b0_again["mask"])
    assert not np.array_equal(b0["tokens"], b1["tokens"])
    assert not np.array_equal(b0["tokens"], BatchLoader(d, "train", 8, 64, seed=4).batch(0)["tokens"])
    assert np.array_equal(loader.batch(7)["tokens"], loader.batch(7)["tokens"])  # any order, any step
    # windows start at row starts (bos) and every 64 tokens inside a row longer than 65 (these rows
    # are 80-110 tokens), and are the stream (and its mask) from there on
    stream, mask, off = np.asarray(d.split("train")), np.asarray(d.mask("train")), d.offsets("train")
    allowed = {int(a) + k * 64 for a, b in zip(off[:-1], off[1:]) for k in range(-(-(b - a - 1) // 64))}
    assert set(loader.starts.tolist()) == allowed and len(allowed) > len(off) - 1
    # rows that all fit the window: row starts only, so such data keeps its batch stream
    assert np.array_equal(BatchLoader(d, "train", 8, 128, seed=3).starts, off[:-1])
    starts = loader.global_starts(0)
    assert set(starts.tolist()) <= allowed
    at_row_start = np.isin(starts, off[:-1])
    assert (b0["tokens"][at_row_start, 0] == d.bos_id).all()
    assert (b0["tokens"][~at_row_start, 0] != d.bos_id).all()
    for row, s in enumerate(starts):
        assert b0["tokens"][row].tolist() == stream[s:s + 65].tolist()
        assert b0["mask"][row].tolist() == mask[s:s + 65].tolist()


def test_loader_process_slices_concatenate_to_the_global_batch(qa_dir):
    d = TokenData.open(qa_dir)
    for step in (0, 5):
        full = BatchLoader(d, "train", 8, 32, seed=1).batch(step)
        for count in (2, 4, 8):
            parts = [BatchLoader(d, "train", 8, 32, seed=1, process_index=i, process_count=count).batch(step)
                     for i in range(count)]
            assert all(p["tokens"].shape == (8 // count, 33) for p in parts)
            for key in ("tokens", "mask"):
                assert np.array_equal(np.concatenate([p[key] for p in parts]), full[key])
    starts = BatchLoader(d, "train", 8, 32, seed=1).global_starts(0)
    assert len(set(starts[:4].tolist()) & set(starts[4:].tolist())) < 4  # distinct slices, not copies
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by the process count 4"):
        BatchLoader(d, "train", 6, 32, seed=1, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2 must be below"):
        BatchLoader(d, "train", 8, 32, seed=1, process_index=2, process_count=2)


def test_loader_wraps_at_the_end_of_the_split(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", ROWS[:2])
    prepare(src, "bytes", str(tmp_path / "out"), val_fraction=0, progress=False, verbose=False)
    d = TokenData.open(str(tmp_path / "out"))
    stream = np.asarray(d.split("train")).tolist()
    loader = BatchLoader(d, "train", 4, 200, seed=0)  # longer than the whole split (139 tokens)
    batch = loader.batch(0)
    for row, s in enumerate(loader.global_starts(0)):
        assert batch["tokens"][row].tolist() == [stream[(s + i) % len(stream)] for i in range(201)]


def test_loader_on_text_starts_anywhere(tmp_path):
    (tmp_path / "a.txt").write_text("абвгд" * 200, encoding="utf-8")
    prepare(str(tmp_path / "a.txt"), "bytes", str(tmp_path / "out"), val_fraction=0,
            progress=False, verbose=False)
    loader = BatchLoader(TokenData.open(str(tmp_path / "out")), "train", 16, 8, seed=0)
    assert len(set(loader.global_starts(0).tolist())) > 8  # not only at the one document start
    assert (loader.batch(0)["mask"] == 1).all()


def test_val_batches_are_fixed_and_cover_each_target_once(qa_dir):
    d = TokenData.open(qa_dir)
    a, b = val_batches(d, 4, 256, 1000), val_batches(d, 4, 256, 1000)  # rows: 80-110 tokens
    assert len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    stream, pad = np.asarray(d.split("val")).tolist(), d.pad_id
    windows = [(x["tokens"][i], x["mask"][i], x["valid"][i]) for x in a for i in range(4)]
    assert all(x["tokens"].shape == x["valid"].shape == (4, 257) and x["valid"].dtype == np.float32
               for x in a)
    used = [w for w in windows if w[2].any()]
    assert len(used) > 4 and len(a) == -(-len(used) // 4)
    for tokens, mask, valid in windows:
        n = int(valid.sum())
        assert (valid[:n] == 1).all() and (tokens[n:] == pad).all() and (mask[n:] == 0).all()
    # whole rows, each window starting at a row start; together they are the val stream, in order
    assert all(t[0] == d.bos_id for t, _, v in used)
    assert sum((t[:int(v.sum())].tolist() for t, _, v in used), []) == stream
    assert all(int(v.sum()) > 257 - 110 for _, _, v in used[:-1])  # packed greedily
    assert len(val_batches(d, 4, 256, 2)) == 2 and len(val_batches(d, 1000, 256, 5)) == 1


def test_val_batches_long_rows_and_text_overlap_by_one(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 95, encoding="utf-8")  # 97 tokens with bos/eos
    prepare(str(tmp_path / "a.txt"), "bytes", str(tmp_path / "out"), val_fraction=0,
            progress=False, verbose=False)
    d = TokenData.open(str(tmp_path / "out"))
    batches = val_batches(d, 2, 32, 10, split="train")  # windows of 33 tokens, stride 32
    spans = [x["tokens"][i][:int(x["valid"][i].sum())].tolist() for x in batches for i in range(2)]
    spans = [s for s in spans if s]
    assert [len(s) for s in spans] == [33, 33, 33]  # starts 0, 32, 64; the last ends at 97
    assert spans[0][-1] == spans[1][0] and spans[1][-1] == spans[2][0]
    stream = np.asarray(d.split("train")).tolist()
    assert spans[0] + spans[1][1:] + spans[2][1:] == stream


# ------------------------------------------------------------------------------------------ tasks

def test_prepare_task_format_heldout_and_idempotence(tmp_path, monkeypatch, capsys):
    from reflex_jax.data import tasks
    out = str(tmp_path / "kv")
    meta = prepare_task("kv_recall", out, n_train=300, n_val=40, seed=2, n_pairs=2)
    assert meta["splits"]["train"]["rows"] == 300 and meta["splits"]["val"]["rows"] == 40
    assert meta["source"]["options"]["n_pairs"] == 2 and meta["tokenizer"] == "bytes"
    d = TokenData.open(out)
    t = tasks.get_task("kv_recall")
    val_questions = set()
    for split in ("train", "val"):
        for ids, mask in d.rows(split):
            text = ByteTokenizer().decode(ids)
            question = text[len("Вопрос: "):text.index("\n### Ответ: ")]
            answer = ByteTokenizer().decode(ids[mask.astype(bool)])
            assert text == D.render_prompt(question) + answer
            assert t.score(answer, answer) and ids[-1] == d.eos_id and mask[-1] == 1
            if split == "val":
                val_questions.add(question)
            else:
                assert question not in val_questions  # val is held out
    assert len(val_questions) == 40
    assert [r["question"] for r in D.task_val_rows(meta)] == [  # regenerated in stored order
        ByteTokenizer().decode(ids)[len("Вопрос: "):].split("\n### Ответ: ")[0] for ids, _ in d.rows("val")]
    # same arguments: the existing directory is returned untouched
    stamp = os.path.getmtime(os.path.join(out, "train.tokens.bin"))
    monkeypatch.setattr(tasks.Task, "rows", lambda *a, **k: pytest.fail("regenerated"))
    assert prepare_task("kv_recall", out, n_train=300, n_val=40, seed=2, n_pairs=2) == meta
    assert "up to date" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "train.tokens.bin")) == stamp
    monkeypatch.undo()
    # other arguments rebuild; tiny task spaces that cannot hold val out fail clearly
    assert prepare_task("kv_recall", out, n_train=300, n_val=40, seed=3, n_pairs=2)["seed"] == 3
    assert TokenData.open(out).meta["seed"] == 3
    with pytest.raises(ValueError, match="too few distinct questions"):
        prepare_task("arith", str(tmp_path / "a"), n_train=50, n_val=30, max_operand=1, verbose=False)
    with pytest.raises(ValueError, match="no option nope"):
        prepare_task("arith", str(tmp_path / "a"), nope=1)


def test_prepare_task_with_hf_tokenizer(tmp_path, hf_bpe):
    meta = prepare_task("arith", str(tmp_path / "a"), tokenizer=hf_bpe, n_train=50, n_val=5,
                        verbose=False)
    d = TokenData.open(str(tmp_path / "a"))
    tok = d.tokenizer()
    assert meta["tokenizer"] == os.path.abspath(hf_bpe)
    for ids, mask in d.rows("val"):
        assert tok.decode(ids[mask.astype(bool)]).strip().isdigit()
        assert "Сколько будет" in tok.decode(ids[~mask.astype(bool)])


# ------------------------------------------------------------------------------------------ long rows

def long_row_dir(tmp_path, long_answer=3000, short=30):
    """`short` short rows and one row whose answer is `long_answer` bytes (one jsonl row)."""
    rows = qa_rows(short)
    rows.insert(short // 2, {"question": "Расскажи длинно", "answer": "x" * long_answer})
    out = str(tmp_path / "long")
    prepare(write_jsonl(tmp_path / "long.jsonl", rows), "bytes", out, val_fraction=0, progress=False,
            verbose=False)
    return TokenData.open(out), short // 2


def test_long_row_is_trained_whole(tmp_path):
    d, r = long_row_dir(tmp_path)
    off, mask = d.offsets("train"), np.asarray(d.mask("train"))
    answer_pos = np.arange(off[r], off[r + 1])[mask[off[r]:off[r + 1]] == 1]
    # windows only at row starts (the loader before) reach 128 of the row's 3,001 answer tokens at most
    before = D.window_reach(d, "train", 128, starts=off[:-1])
    assert before["unreachable_answer_tokens"] > 0.97 * len(answer_pos)
    loader = BatchLoader(d, "train", 8, 128, seed=0)
    assert loader.reach["unreachable_answer_tokens"] == 0 and loader.reach["long_rows"] == 1
    # brute force: the union of all windows' targets holds every answer token
    target = np.zeros(len(mask), bool)
    for s in loader.starts:
        target[(s + 1 + np.arange(128)) % len(mask)] = True
    assert target[mask == 1].all()
    assert loader.summary() == (
        f"train: 1 of 31 rows are longer than the 129-token window (the longest {off[r + 1] - off[r]:,}), "
        f"and windows start inside them every 128 tokens, so answer tokens out of reach: 0 of "
        f"{int(mask.sum()):,} (0.0%)")
    # and training batches do reach them: every answer token of the long row is a target by step 300
    seen = np.zeros(len(mask), bool)
    for step in range(300):
        for s in loader.global_starts(step):
            seen[s + 1:s + 129] = True
    assert seen[answer_pos].all()
    # resume: a fresh loader on the same files gives the same batches, in any order
    again = BatchLoader(TokenData.open(d.directory), "train", 8, 128, seed=0)
    for step in (299, 5, 17):
        assert np.array_equal(again.batch(step)["tokens"], loader.batch(step)["tokens"])
        assert np.array_equal(again.batch(step)["mask"], loader.batch(step)["mask"])


def test_split_pieces_are_one_row_for_the_loader(tmp_path):
    rows = qa_rows(10) + [{"question": "длинно", "answer": "y" * 500}]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    prepare(src, "bytes", str(tmp_path / "keep"), val_fraction=0, progress=False, verbose=False)
    keep = TokenData.open(str(tmp_path / "keep"))
    prepare(src, "bytes", str(tmp_path / "split"), val_fraction=0, long_rows="split", max_tokens=129,
            progress=False, verbose=False)
    split = TokenData.open(str(tmp_path / "split"))
    assert len(split.offsets("train")) > len(keep.offsets("train"))  # pieces are rows on disk
    for seq_len in (128, 100, 37):  # 128: the pieces' own window, where piece starts would lose a token
        a, b = BatchLoader(keep, "train", 4, seq_len, 0), BatchLoader(split, "train", 4, seq_len, 0)
        assert np.array_equal(a.starts, b.starts) and b.reach["unreachable_answer_tokens"] == 0
    # windows at piece starts only: the first token of each later piece (all answer) is nobody's target
    pieces = int((split.source_rows("train") == 10).sum())
    assert pieces == -(-(44 + 501) // 129)  # bos + 43 prompt bytes, 500 answer bytes + eos
    piece_starts = split.offsets("train")[:-1]
    assert D.window_reach(split, "train", 128, starts=piece_starts)["unreachable_answer_tokens"] == pieces - 1


@pytest.mark.parametrize("seed", range(6))
def test_uncovered_counts_match_brute_force(seed):
    from reflex_jax.data.windows import uncovered
    rng = np.random.default_rng(seed)
    n, seq_len = int(rng.integers(5, 60)), int(rng.integers(1, 12))
    mask = rng.integers(0, 2, n).astype(np.uint8)
    starts = np.unique(rng.integers(0, n, int(rng.integers(1, 8))))
    target = np.zeros(n, bool)
    for s in starts:
        target[(s + 1 + np.arange(seq_len)) % n] = True
    assert uncovered(starts, seq_len, n, mask) == (int((~target).sum()), int((~target & (mask == 1)).sum()))


def test_info_reports_long_rows_for_a_block_size(tmp_path, capsys):
    d, _ = long_row_dir(tmp_path, long_answer=400, short=4)
    assert main(["info", d.directory, "--block_size", "128"]) == 0
    out = capsys.readouterr().out
    assert "train: 1 of 5 rows are longer than the 129-token window" in out
    assert "answer tokens out of reach: 0 of" in out
    assert main(["info", d.directory, "--block_size", "1024"]) == 0
    assert "train: every row fits the 1,025-token window" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ token range

def test_token_ids_are_checked_against_the_model_vocab(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    out = str(tmp_path / "out")
    meta = prepare(src, "bytes", out, val_fraction=0.1, progress=False, verbose=False)
    assert meta["splits"]["train"]["max_id"] == meta["splits"]["val"]["max_id"] == 258  # eos
    d = TokenData.open(out)
    assert D.check_token_range(d, 259) == {"train": 258, "val": 258}
    with pytest.raises(ValueError, match=r"the train split of .* holds token id 258 \(the first id >= "
                                         r"200 is in row 0, stream position 0\) but the model's "
                                         r"vocab_size is 200; set model.vocab_size to at least 259"):
        D.check_token_range(d, 200)
    # a token file changed after prepare: its ids disagree with meta.json
    tokens = np.memmap(os.path.join(out, "train.tokens.bin"), np.uint16, "r+")
    row5 = int(d.offsets("train")[5])
    tokens[row5 + 3] = 300
    tokens.flush()
    del tokens
    with pytest.raises(ValueError, match=r"holds token ids up to 300 but its meta.json records 258, so "
                                         r"the file was changed after it was prepared; prepare"):
        D.check_token_range(TokenData.open(out), 1000)
    # a meta.json without max_id (another tool): the scan alone finds the row of the bad id
    with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
        raw = json.load(f)
    del raw["splits"]["train"]["max_id"]
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match=rf"holds token id 300 \(the first id >= 259 is in row 5, "
                                         rf"stream position {row5 + 3:,}\)") as info:
        D.check_token_range(TokenData.open(out), 259)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ re-preparing

def test_reprepare_from_another_source_refuses_unless_overwrite(tmp_path, capsys):
    a, b = write_jsonl(tmp_path / "a.jsonl", qa_rows(20)), write_jsonl(tmp_path / "b.jsonl", qa_rows(25, 1))
    out = str(tmp_path / "out")
    first = prepare(a, "bytes", out, val_fraction=0, progress=False, verbose=False)
    fp = D.data_fingerprint(TokenData.open(out))
    assert len(fp) == 16 and D.data_fingerprint(out) == fp
    # the same source and options: reused as it is
    stamp = os.path.getmtime(os.path.join(out, "train.tokens.bin"))
    assert prepare(a, "bytes", out, val_fraction=0, progress=False) == first
    assert "up to date" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "train.tokens.bin")) == stamp
    # the same inputs into another directory: the same fingerprint
    prepare(a, "bytes", str(tmp_path / "copy"), val_fraction=0, progress=False, verbose=False)
    assert D.data_fingerprint(str(tmp_path / "copy")) == fp
    # another source, an edited source, another tokenizer, a task: refused, nothing changes
    write_jsonl(tmp_path / "a2.jsonl", qa_rows(20))
    cases = [(b, {}, r"another source \(a.jsonl\)"), (a, {"seed": 1, "long_rows": "drop", "max_tokens": 50},
             r"other options \(seed, long_rows differ\)")]
    for source, kwargs, message in cases:
        with pytest.raises(ValueError, match=rf"already holds data prepared from {message}; pass "
                                             r"--overwrite \(overwrite=True\) to replace it") as info:
            prepare(source, "bytes", out, **{"val_fraction": 0, **kwargs}, progress=False, verbose=False)
        assert "\n" not in str(info.value)
    with open(a, "a", encoding="utf-8") as f:
        f.write(json.dumps({"question": "ещё", "answer": "один"}, ensure_ascii=False) + "\n")
    with pytest.raises(ValueError, match=r"another version of a.jsonl \(its content changed\)"):
        prepare(a, "bytes", out, val_fraction=0, progress=False, verbose=False)
    with pytest.raises(ValueError, match=r"prepared from a.jsonl, not a built-in task; pass --overwrite"):
        prepare_task("arith", out, n_train=20, n_val=2, verbose=False)
    assert D.data_fingerprint(out) == fp and os.path.getmtime(os.path.join(out, "train.tokens.bin")) == stamp
    # the CLI: one line without --overwrite, replaced with it
    args = ["prepare", "--source", b, "--tokenizer", "bytes", "--out", out, "--val_fraction", "0",
            "--no_progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reflex_jax.data: error: ") and "--overwrite" in err[0]
    assert main(args + ["--overwrite"]) == 0
    assert TokenData.open(out).meta["splits"]["train"]["rows"] == 25 and D.data_fingerprint(out) != fp
    # a task directory is not replaced by a source, but by another task's arguments it is regenerated
    task_dir = str(tmp_path / "task")
    prepare_task("arith", task_dir, n_train=20, n_val=2, verbose=False)
    with pytest.raises(ValueError, match=r"already holds data prepared from the built-in task 'arith'"):
        prepare(a, "bytes", task_dir, progress=False, verbose=False)
    task_fp = D.data_fingerprint(task_dir)
    prepare_task("arith", task_dir, n_train=20, n_val=2, seed=5, verbose=False)
    assert D.data_fingerprint(task_dir) != task_fp


# ------------------------------------------------------------------------------------------ full disk

def _mount_tmpfs(path, size):
    import subprocess
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the RLIMIT_FSIZE test covers failed writes)")
    os.makedirs(path)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")


def test_prepare_onto_a_full_disk_is_one_sentence_and_keeps_the_old_data(tmp_path, capsys):
    import subprocess
    small = tmp_path / "small"
    _mount_tmpfs(small, "1m")
    try:
        out = str(small / "out")
        old = write_jsonl(tmp_path / "old.jsonl", qa_rows(30))
        prepare(old, "bytes", out, val_fraction=0, progress=False, verbose=False)
        fp = D.data_fingerprint(out)
        big = write_jsonl(tmp_path / "big.jsonl", qa_rows(8000))  # ~800k tokens: 2.4 MB of files
        assert main(["prepare", "--source", big, "--tokenizer", "bytes", "--out", out, "--overwrite",
                     "--no_progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert re.fullmatch(rf"reflex_jax\.data: error: could not write [\d,]+ bytes in '{small}' "
                            rf"\(No space left on device\), so '{out}' was not published and its "
                            rf"earlier preparation is unchanged; free space there or write the data "
                            rf"elsewhere \(prepare's --out; train\.py writes a task's data under "
                            rf"--config\.run_dir\)\.", err[0]), err[0]
        assert D.data_fingerprint(out) == fp  # the old data is still there, whole
        assert sorted(os.listdir(small)) == ["out"]  # no temporary directory left behind
        # into an empty directory: nothing is published
        with pytest.raises(ValueError, match=r"was not published and nothing was left there"):
            prepare(big, "bytes", str(small / "new"), progress=False, verbose=False)
        assert not os.path.exists(small / "new" / "meta.json")
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_prepare_past_a_file_size_limit_is_one_sentence(tmp_path):
    import subprocess
    import sys
    src = write_jsonl(tmp_path / "big.jsonl", qa_rows(3000))  # ~300k tokens: a 600 KB token file
    out = str(tmp_path / "out")
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
              "from reflex_jax.cli.data import main\n"
              f"sys.exit(main(['prepare', '--source', {src!r}, '--tokenizer', 'bytes', '--out', {out!r}, "
              "'--no_progress']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(
        rf"reflex_jax\.data: error: could not write [\d,]+ bytes in '{tmp_path}' \(File too large\), "
        rf"so '{out}' was not published and nothing was left there; free space there or write the "
        rf"data elsewhere \(prepare's --out; train\.py writes a task's data under "
        rf"--config\.run_dir\)\.", err[0]), err
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_a_lone_surrogate_in_a_row_is_counted_and_skipped(tmp_path, capsys):
    """JSON's "\\ud800" decodes to a str no tokenizer can encode: one bad row, not a traceback."""
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, ROWS[:3], ['{"question": "\\ud800 half an emoji", "answer": "a"}',
                                 '{"question": "q", "answer": "a \\udfff"}'])
    out = str(tmp_path / "out")
    assert main(["prepare", "--source", str(path), "--tokenizer", "bytes", "--out", out,
                 "--val_fraction", "0", "--no_progress"]) == 0
    meta = json.load(open(os.path.join(out, "meta.json"), encoding="utf-8"))
    assert meta["skipped"] == {"invalid_unicode(question)": 1, "invalid_unicode(answer)": 1}
    assert meta["splits"]["train"]["rows"] == 3 and meta["source_rows"] == 5
    assert "invalid_unicode(question) 1" in capsys.readouterr().out
    # a template given on the command line follows the same policy (surrogate-escaped argv bytes)
    assert main(["prepare", "--source", str(path), "--tokenizer", "bytes", "--out", out + "2",
                 "--template", "Q\udcff {question} A: {answer}"]) == 2
    assert capsys.readouterr().err.strip() == ("reflex_jax.data: error: --template is not valid "
                                               "UTF-8 at byte 1, byte 0xff; give the text in UTF-8 "
                                               "(e.g. iconv -f <encoding> -t utf-8).")


def test_a_symlink_out_of_a_txt_directory_is_skipped_and_named(tmp_path, capsys):
    """A symlink in a directory of .txt documents to a file elsewhere (here a stand-in for
    ~/.ssh/id_rsa) became a training document; now it is never opened, it is counted, and
    meta.json names it, with the other skipped documents."""
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("SECRET KEY MATERIAL")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("первый документ\n", encoding="utf-8")
    (docs / "sub" / "b.txt").write_text("второй документ\n", encoding="utf-8")
    (docs / "blank.txt").write_text("  \n")
    os.symlink(docs / "a.txt", docs / "inside.txt")  # a link that stays inside is a document
    os.symlink(secret, docs / "link.txt")
    out = str(tmp_path / "out")
    assert main(["prepare", "--source", str(docs), "--tokenizer", "bytes", "--out", out,
                 "--val_fraction", "0", "--no_progress"]) == 0
    meta = json.load(open(os.path.join(out, "meta.json"), encoding="utf-8"))
    assert meta["skipped"] == {"empty_document": 1, "outside_source_dir": 1}
    assert meta["skipped_files"] == [
        {"path": str(docs / "blank.txt"), "reason": "empty_document"},
        {"path": str(docs / "link.txt"), "reason": "outside_source_dir"}]
    assert [f["path"] for f in meta["source"]["files"]] == [  # the link is not even hashed
        str(docs / p) for p in ("a.txt", "blank.txt", "inside.txt", "sub/b.txt")]
    assert str(secret) not in json.dumps(meta)
    ids = np.concatenate([np.asarray(r[0]) for r in all_rows(TokenData.open(out))])
    assert b"SECRET" not in bytes(int(i) for i in ids if i < 256)
    assert meta["splits"]["train"]["rows"] == 3
    assert "outside_source_dir 1" in capsys.readouterr().out


def test_an_unreachable_hub_is_one_sentence_at_once(tmp_path, monkeypatch):
    """No network: the hub libraries would retry for ~23 s, a line per try; the host's name not
    resolving ends it at once, in one sentence, for datasets, tokenizers and snapshots alike."""
    import time
    from reflex_jax.errors import ConvertError
    from reflex_jax.interop.hub import snapshot
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"'someone/rows' is not a local path, and the HF hub cannot "
                                         r"be reached to load it as a dataset \(name resolution of "
                                         r"hub.invalid failed: .*\); pass local"):
        prepare("someone/rows", "bytes", str(tmp_path / "out"), progress=False)
    with pytest.raises(FileNotFoundError, match=r"tokenizer 'someone/tok' is not a local tokenizer "
                                                r"directory, and the HF hub cannot be reached"):
        load_tokenizer("someone/tok")
    with pytest.raises(ConvertError, match=r"--hf 'someone/model' is not a local directory, and the "
                                           r"HF hub cannot be reached to fetch it"):
        snapshot("someone/model", ["*.json"], "--hf", "a local directory")
    assert time.monotonic() - t0 < 5
    assert not os.path.exists(tmp_path / "out")


def test_ranged_array_reads_what_a_memmap_reads_and_caches_chunks(tmp_path):
    """RangedArray (data in a bucket, read by range) over a local file: slices, integers, negative
    indices, index arrays and the loader's wrap-around windows equal np.memmap's; only the chunks
    a read touches are fetched, each once; a file cut short is one sentence."""
    from reflex_jax.data.loader import window
    from reflex_jax.data.ranged import RangedArray
    path = tmp_path / "t.bin"
    stream = np.arange(1000, dtype=np.uint16) * 7
    stream.tofile(path)
    ref = np.memmap(path, np.uint16, "r")
    ranged = RangedArray(str(path), np.uint16, len(stream), str(tmp_path / "cache"), chunk_bytes=64)
    assert ranged.chunk_items == 32 and len(ranged) == 1000 and ranged.shape == (1000,)
    np.testing.assert_array_equal(ranged[100:140], ref[100:140])  # two chunks
    assert ranged.fetched_bytes == 128
    assert sorted(os.listdir(tmp_path / "cache")) == ["3.chunk", "4.chunk"]
    np.testing.assert_array_equal(ranged[100:140], ref[100:140])
    assert ranged.fetched_bytes == 128  # from memory the second time
    for key in (slice(0, 1), slice(990, None), slice(5, 5), slice(0, 100, 9), 999, -1, 31, 32):
        np.testing.assert_array_equal(ranged[key], ref[key])
    index = np.array([[5, 999], [-3, 64]])
    np.testing.assert_array_equal(ranged[index], ref[index])
    np.testing.assert_array_equal(window(ranged, 980, 50), window(ref, 980, 50))
    np.testing.assert_array_equal(np.asarray(ranged), ref)
    again = RangedArray(str(path), np.uint16, len(stream), str(tmp_path / "cache"), chunk_bytes=64)
    np.testing.assert_array_equal(again[100:140], ref[100:140])
    assert again.fetched_bytes == 0  # from the cache directory
    with pytest.raises(IndexError):
        ranged[1000]
    short = RangedArray(str(path), np.uint16, 1100, str(tmp_path / "c2"), chunk_bytes=64)
    from reflex_jax.errors import DataError
    with pytest.raises(DataError, match=r"ended 24 bytes early in chunk 34; .* prepare the "
                                          r"directory again\.$"):
        short[1090]
