"""Held-out metrics beyond the val loss: bits per byte (byte tables of the byte tokenizer, a
byte-level BPE and a word-level fallback), exact match by recall distance, the answer-only loss,
their metrics.jsonl keys, and their columns in the compare.py tables."""
import json
import math
import os

import jax
import numpy as np
import pytest

from reflex_jax.data import ByteTokenizer, TokenData, get_task, load_tokenizer, prepare_task
from reflex_jax.data.tasks import _NOUNS
from reflex_jax.data.tokenizer import BYTE_ALPHABET
from reflex_jax.model import Decoder, ModelConfig, init_params
from reflex_jax.train import validation
from reflex_jax.train.exact_match import ExactMatch, exact_match_by_distance
from reflex_jax.train.step import StepSettings
from reflex_jax.train.trainer import Trainer
from reflex_lab.compare.grid import plan_grid
from reflex_lab.compare.report import write_report
from reflex_lab.compare.stats import aggregate, collect
from byte_bpe import train_byte_bpe
from marks import fast_only
from test_compare import fabricate, small_config as compare_config
from test_tasks import parse_kv
from test_trainer import read_metrics, small_config

TEXTS = ["Сколько будет два плюс два? Четыре.", "Привет, как дела? Хорошо, спасибо!",
         "Запомни: кот — 5, дом — 8. Сколько у дома?", "Кошка спит на окне, а пёс гуляет."]
UNSEEN = "ёжик щука «ъ» 😀 ü"  # characters the BPE never merged: their bytes are split tokens


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE (GPT-2 style) trained on Russian text: merges make multi-byte tokens."""
    return train_byte_bpe(TEXTS * 20, 360, str(tmp_path_factory.mktemp("tok") / "bpe"))


# ---- byte tables --------------------------------------------------------------------------------

def test_byte_tokenizer_table():
    table = ByteTokenizer().byte_lengths()
    assert table.shape == (259,) and table[:256].tolist() == [1] * 256
    assert table[[256, 257, 258]].tolist() == [0, 0, 0]  # pad, bos, eos


def test_byte_level_bpe_table_is_each_token_s_bytes(bpe_dir):
    from tokenizers import pre_tokenizers
    assert BYTE_ALPHABET == frozenset(pre_tokenizers.ByteLevel.alphabet())
    tok = load_tokenizer(bpe_dir)
    table = tok.byte_lengths()
    assert table.shape == (tok.vocab_size,)
    assert table[[tok.pad_id, tok.bos_id, tok.eos_id]].tolist() == [0, 0, 0]
    whole = 0
    for i in range(tok.vocab_size):
        text = tok.tok.decode([i])
        if i not in (tok.pad_id, tok.bos_id, tok.eos_id) and "\ufffd" not in text:
            assert table[i] == len(text.encode("utf-8")), (i, text)
            whole += 1
    assert whole > 100
    # merged Cyrillic tokens span several 2-byte letters
    for word in (" плюс", "Сколько"):
        (i,) = tok.encode(word)
        assert table[i] == len(word.encode("utf-8")) >= 9
    # every token of any text, partial bytes of a letter included, adds up to its UTF-8 bytes
    for text in TEXTS + [UNSEEN]:
        assert int(table[tok.encode(text)].sum()) == len(text.encode("utf-8")), text


def test_other_hf_tokenizers_fall_back_to_decoded_bytes(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "кот": 4, "ёж": 5, "cat": 6}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="[UNK]").save_pretrained(str(tmp_path / "w"))
    assert load_tokenizer(str(tmp_path / "w")).byte_lengths().tolist() == [0, 0, 0, 0, 6, 4, 3]


# ---- bits per byte of a model, by hand --------------------------------------------------------------

def _batch(tok, texts, length):
    """tokens/mask/valid [B, length]: bos + text, pad after; the mask marks the second half."""
    tokens = np.full((len(texts), length), tok.pad_id, np.int32)
    mask, valid = np.zeros(tokens.shape, np.float32), np.zeros(tokens.shape, np.float32)
    for b, text in enumerate(texts):
        ids = [tok.bos_id] + tok.encode(text)
        tokens[b, :len(ids)], valid[b, :len(ids)] = ids, 1.0
        mask[b, len(ids) // 2:len(ids)] = 1.0
    return tokens, mask, valid


@pytest.mark.parametrize("tokenizer", fast_only(["bytes", "bpe"], "bytes"))
def test_bits_per_byte_equals_hand_computation(tokenizer, bpe_dir):
    tok = load_tokenizer("bytes" if tokenizer == "bytes" else bpe_dir)
    table = tok.byte_lengths()
    texts = [TEXTS[0], TEXTS[2], UNSEEN]
    length = max(len(tok.encode(t)) for t in texts) + 1
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.vocab_size, block_size=length,
                      head_plan="all")
    params = init_params(cfg, jax.random.PRNGKey(1))
    tokens, mask, valid = _batch(tok, texts, length)
    every, answers = StepSettings(Decoder(cfg), "all"), StepSettings(Decoder(cfg), "answer")
    batch = {"tokens": tokens, "mask": mask, "valid": valid}
    sums, answer_sums, logits = jax.jit(lambda p, b: (
        validation.eval_sums(every, table, p, b), validation.eval_sums(answers, table, p, b),
        Decoder(cfg).apply({"params": p}, b["tokens"][:, :-1])))(params, batch)
    logits, targets = np.asarray(logits, np.float64), tokens[:, 1:]
    top = logits.max(-1)
    ce = np.log(np.exp(logits - top[..., None]).sum(-1)) + top - np.take_along_axis(
        logits, targets[..., None], -1)[..., 0]
    w, answer_w = valid[:, 1:], valid[:, 1:] * mask[:, 1:]
    n_bytes = float((table[targets] * w).sum())
    # every byte of every text is a target once, whatever the tokenizer
    assert n_bytes == float(sums["bytes"]) == sum(len(t.encode("utf-8")) for t in texts)
    m = validation.val_metrics([sums], answers=True)
    assert m["val_loss"] == pytest.approx((ce * w).sum() / w.sum(), rel=1e-5)
    assert m["val_bpb"] == pytest.approx((ce * w).sum() / (math.log(2) * n_bytes), rel=1e-5)
    assert m["val_answer_loss"] == pytest.approx((ce * answer_w).sum() / answer_w.sum(), rel=1e-5)
    assert abs(m["val_loss"] - m["val_answer_loss"]) > 0.01  # loss_on=all: every token counts
    a = validation.val_metrics([answer_sums], answers=True)  # loss_on=answer: the same answer loss
    assert a["val_loss"] == a["val_answer_loss"] == pytest.approx(m["val_answer_loss"], rel=1e-6)
    assert a["val_bpb"] == pytest.approx(
        (ce * answer_w).sum() / (math.log(2) * (table[targets] * answer_w).sum()), rel=1e-5)


# ---- exact match by distance --------------------------------------------------------------------------

def test_kv_rows_record_their_distance_and_keep_their_text():
    kv = get_task("kv_recall")
    genitive = {g: n for n, g in _NOUNS}
    for r in kv.rows(60, 4, n_pairs=4):
        pairs, asked = parse_kv(r["question"])
        assert r["distance"] == 4 - [k for k, _ in pairs].index(genitive[asked])
    assert {r["distance"] for r in kv.rows(20, 0, n_pairs=3, distance=2)} == {2}
    # the rows of a seed are those drawn before the distance was recorded, plus the distance
    assert kv.rows(2, 0, n_pairs=3) == [
        {"question": "Запомни: лук — 9, суп — 1, мышь — 8. Сколько у супа?", "answer": "1",
         "distance": 2},
        {"question": "Запомни: нос — 6, суп — 5, крот — 6. Сколько у носа?", "answer": "6",
         "distance": 3}]
    assert all("distance" not in r for r in get_task("arith").rows(20, 0))


def test_exact_match_by_distance_buckets_given_hits():
    rows = [{"distance": 1}, {"distance": 1}, {"distance": 2}, {}, {"distance": 3}, {"distance": 1}]
    hits = [True, False, True, True, False, True]
    assert exact_match_by_distance(hits, rows) == {
        "exact_match_d1": 2 / 3, "exact_match_d2": 1.0, "exact_match_d3": 0.0}
    assert exact_match_by_distance([True], [{}]) == {}


class _ScriptedGenerator:
    """Stands in for sampling.Generator: returns the given answers' tokens, then eos."""

    def __init__(self, tok, answers):
        self.tok, self.answers = tok, answers

    def generate(self, params, prompts, max_new_tokens, eos_id, pad_id):
        assert len(prompts) == len(self.answers)
        return [self.tok.encode(a) + [eos_id] for a in self.answers]


def test_exact_match_reports_each_distance_on_scripted_answers(tmp_path):
    prepare_task("mix", str(tmp_path / "d"), n_train=50, n_val=40, seed=3, verbose=False, n_pairs=3)
    data = TokenData.open(str(tmp_path / "d"))
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=259, block_size=160)
    em = ExactMatch(data, cfg, "mix", 40)
    rows = em.rows
    # right on every arithmetic row and at distances 1 and 3, wrong at distance 2
    answers = [r["answer"] + ("0" if r.get("distance") == 2 else "") for r in rows]
    em._generator = _ScriptedGenerator(em.tok, answers)
    out = em(None, None)
    count = {d: sum(r.get("distance") == d for r in rows) for d in (1, 2, 3)}
    assert min(count.values()) > 0 and sum(count.values()) < len(rows)  # arith rows too
    assert out == {"exact_match": 1 - count[2] / len(rows), "exact_match_d1": 1.0,
                   "exact_match_d2": 0.0, "exact_match_d3": 1.0}


# ---- answer-only loss and the metrics rows of a real run ------------------------------------------------

def _kv_config(run_dir, loss_on, **kw):
    return small_config(run_dir, **{"data.task": "kv_recall", "data.task_options.n_pairs": 2,
                                    "model.block_size": 128, "model.n_layer": 1, "model.n_head": 2,
                                    "data.task_rows": 64, "data.loss_on": loss_on, **kw})


@pytest.mark.slow
def test_answer_loss_and_bpb_in_metrics_rows(tmp_path):
    c = _kv_config(tmp_path / "run", "all", max_steps=2, eval_interval=2)
    trainer = Trainer(c, log=lambda s: None)
    trainer.train()
    row = read_metrics(c.run_dir)[-1]
    assert row["step"] == 2 and {"val_loss", "val_bpb", "val_answer_loss"} <= set(row)
    # by hand from the val batches: targets per byte (bos/eos count 0 bytes), answer targets
    targets = n_bytes = answer_targets = 0.0
    for b in trainer.evaluator.val_batches():
        valid, answer = b["valid"][:, 1:], b["mask"][:, 1:] * b["valid"][:, 1:]
        targets, answer_targets = targets + valid.sum(), answer_targets + answer.sum()
        n_bytes += (valid * (b["tokens"][:, 1:] < 256)).sum()
    assert row["val_bpb"] == pytest.approx(row["val_loss"] * targets / (math.log(2) * n_bytes),
                                           rel=1e-5)
    # loss_on=all trains on every token; the answer loss still covers the answers (digit + eos)
    assert 0 < answer_targets < targets / 20
    assert abs(row["val_answer_loss"] - row["val_loss"]) > 0.01
    again = trainer.evaluator(trainer.state.params)  # the row holds the final params' metrics
    assert again == pytest.approx({k: row[k] for k in again}, rel=1e-6)


# ---- compare.py tables ---------------------------------------------------------------------------------

def test_compare_tables_show_the_new_metrics(tmp_path):
    runs = plan_grid(compare_config(), ["none", "all"], [0], str(tmp_path / "runs"))
    extra = {"none": (1.25, 0.9, 0.5, 0.25), "all": (1.5, 0.8, 0.75, 0.5)}  # bpb, answer, d1, d2
    for run in runs:
        fabricate(run.run_dir, [3.0, 2.8, 2.6], exact=[0.1, 0.2, 0.3])
        path = os.path.join(run.run_dir, "metrics.jsonl")
        rows = [json.loads(line) for line in open(path)]
        bpb, answer, d1, d2 = extra[run.schedule]
        for r in rows:
            if "val_loss" in r:
                r.update(val_bpb=bpb + 1 - r["step"] / 30, val_answer_loss=answer,
                         exact_match_d1=d1, exact_match_d2=d2)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    summaries = collect(runs)
    out = tmp_path / "out"
    write_report(str(out), runs, summaries, aggregate(summaries))
    data = json.loads((out / "results.json").read_text())
    g = {g["group"]: g for g in data["groups"]}
    assert g["all"]["final_val_bpb"]["mean"] == pytest.approx(1.5)  # the last eval row's
    assert g["none"]["final_val_answer_loss"]["mean"] == pytest.approx(0.9)
    assert g["all"]["final_exact_match_d2"]["mean"] == pytest.approx(0.5)
    assert data["runs"][0]["final_exact_match_d1"] == 0.5
    md = (out / "results.md").read_text().splitlines()
    head = next(line for line in md if line.startswith("| group |"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    cells = [c.strip() for c in next(line for line in md if line.startswith("| `all` |"))
             .strip("|").split("|")]
    assert cells[cols.index("final val loss")] == "2.600"  # the old columns keep their places
    assert cells[cols.index("final val bpb")] == "1.500"
    assert cells[cols.index("final answer loss")] == "0.800"
    assert (cells[cols.index("final EM d1")], cells[cols.index("final EM d2")]) == ("75.0%", "50.0%")
    run_head = next(line for line in md if line.startswith("| run |"))
    run_cols = [c.strip() for c in run_head.strip("|").split("|")]
    run_cells = [c.strip() for c in next(line for line in md if line.startswith("| `none-s0` |"))
                 .strip("|").split("|")]
    assert len(run_cells) == len(run_cols)
    assert run_cells[run_cols.index("final val bpb")] == "1.2500"
    assert run_cells[run_cols.index("final EM d2")] == "25.0%"
    assert any("val bpb: bits per UTF-8 byte" in line for line in md)
