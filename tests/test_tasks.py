"""Built-in synthetic tasks: deterministic generators, correct answers, exact-match scorer."""
import re

import pytest

from reflex_jax.data import DEFAULT_TEMPLATE, TASKS, get_task, render_prompt
from reflex_jax.data.tasks import _NOUNS

ARITH = re.compile(r"Сколько будет (\d+) (плюс|минус|умножить на) (\d+)\?")
KV = re.compile(r"Запомни: (.*)\. Сколько у (\w+)\?")


def parse_kv(question):
    m = KV.fullmatch(question)
    assert m, question
    pairs = [p.split(" — ") for p in m.group(1).split(", ")]
    return [(k, int(v)) for k, v in pairs], m.group(2)


@pytest.mark.parametrize("name", ["arith", "kv_recall", "mix"])
def test_generators_are_deterministic_per_seed(name):
    task = get_task(name)
    a, b, c = task.rows(200, 0), task.rows(200, 0), task.rows(200, 1)
    assert a == b
    assert a != c
    assert task.rows(50, 0) == a[:50]  # a prefix of the same stream
    assert all({"question", "answer"} <= set(r) <= {"question", "answer", "distance"}
               and r["question"] and r["answer"] for r in a)


def test_arith_answers_are_right():
    rows = get_task("arith").rows(500, 3, max_operand=20)
    ops = set()
    for r in rows:
        a, op, b = ARITH.fullmatch(r["question"]).groups()
        a, b = int(a), int(b)
        ops.add(op)
        assert 0 <= a <= 20 and 0 <= b <= 20
        assert int(r["answer"]) == (a + b if op == "плюс" else a - b)
        assert int(r["answer"]) >= 0  # minus never goes negative by default
    assert ops == {"плюс", "минус"}
    neg = get_task("arith").rows(300, 3, ops="minus", allow_negative=True)
    assert any(r["answer"].startswith("-") for r in neg)
    times = get_task("arith").rows(50, 0, ops=["times"], max_operand=9)
    for r in times:
        a, _, b = ARITH.fullmatch(r["question"]).groups()
        assert r["answer"] == str(int(a) * int(b))


def test_kv_recall_answers_are_right_and_distance_is_honoured():
    genitive = {g: n for n, g in _NOUNS}
    for n_pairs in (1, 3, 7):
        for distance in range(1, n_pairs + 1):
            for r in get_task("kv_recall").rows(30, 5, n_pairs=n_pairs, distance=distance):
                pairs, asked = parse_kv(r["question"])
                keys = [k for k, _ in pairs]
                assert len(pairs) == n_pairs and len(set(keys)) == n_pairs
                index = keys.index(genitive[asked])
                assert index == n_pairs - distance  # distance 1 = the last pair said
                assert r["answer"] == str(pairs[index][1])
    # distance 0 (default): every distance occurs
    seen = set()
    for r in get_task("kv_recall").rows(300, 0, n_pairs=4):
        pairs, asked = parse_kv(r["question"])
        seen.add(4 - [k for k, _ in pairs].index(genitive[asked]))
    assert seen == {1, 2, 3, 4}


def test_noun_table_is_consistent():
    noms, gens = [n for n, _ in _NOUNS], [g for _, g in _NOUNS]
    assert len(set(noms)) == len(noms) and len(set(gens)) == len(gens)
    assert all(n != g for n, g in _NOUNS)


def test_mix_draws_both_and_routes_options():
    rows = get_task("mix").rows(200, 0, n_pairs=2, max_operand=5)
    kv = [r for r in rows if r["question"].startswith("Запомни")]
    ar = [r for r in rows if ARITH.fullmatch(r["question"])]
    assert len(kv) + len(ar) == 200 and 50 < len(kv) < 150
    assert all(len(parse_kv(r["question"])[0]) == 2 for r in kv)
    assert all(max(map(int, ARITH.fullmatch(r["question"]).group(1, 3))) <= 5 for r in ar)


@pytest.mark.parametrize("name", ["arith", "kv_recall", "mix"])
def test_default_rows_fit_block_128_with_bytes(name):
    # bos + rendered row + eos, one byte each: the tiny default run uses block_size 128
    lengths = [len((render_prompt(r["question"]) + r["answer"]).encode()) + 2
               for r in get_task(name).rows(2000, 0)]
    assert max(lengths) <= 128
    assert min(lengths) > 40


def test_scorer_hand_made_cases():
    task = TASKS["arith"]
    assert task.score("42", "42")
    assert task.score(" 42 \n", "42")
    assert not task.score("42.", "42")
    assert not task.score("4", "42")
    assert not task.score("", "0")
    assert not task.score("42 43", "42")
    assert TASKS["kv_recall"].score("8", " 8")
    assert not TASKS["kv_recall"].score("8", "3")


def test_render_prompt():
    assert render_prompt("Сколько?") == "Вопрос: Сколько?\n### Ответ: "
    assert render_prompt("q") + "a" == DEFAULT_TEMPLATE.format(question="q", answer="a")
    assert render_prompt("q", "Q: {question}\nA: {answer}") == "Q: q\nA: "
    with pytest.raises(ValueError, match="placeholders"):
        render_prompt("q", "{instruction} {answer}")


def test_bad_names_and_options_are_clear():
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*arith, kv_recall, mix"):
        get_task("nope")
    with pytest.raises(ValueError, match=r"no option n_pair;.*n_pairs"):
        get_task("kv_recall").rows(1, 0, n_pair=3)
    with pytest.raises(ValueError, match="distance=5 must be between 1 and n_pairs=3"):
        get_task("kv_recall").rows(1, 0, distance=5)
    with pytest.raises(ValueError, match="n_pairs=100 exceeds"):
        get_task("kv_recall").rows(1, 0, n_pairs=100)
    with pytest.raises(ValueError, match="unknown operation divide"):
        get_task("arith").rows(1, 0, ops="plus,divide")
    with pytest.raises(ValueError, match="no option bogus"):
        get_task("mix").rows(1, 0, bogus=1)


def test_kv_recall_queries_ask_distinct_pairs_each_followed_by_its_value():
    rows = get_task("kv_recall").rows(200, 0, n_pairs=6, queries=4)
    # one pair a row keeps its rows exactly (prepared directories stay valid)
    assert get_task("kv_recall").rows(50, 0, n_pairs=6) == get_task("kv_recall").rows(50, 0, n_pairs=6,
                                                                                       queries=1)
    seen = set()
    for r in rows:
        pairs, first = parse_kv(r["question"])
        asked = [first] + re.findall(r"Сколько у (\w+)\? ", r["answer"])
        noms = [{gen: nom for nom, gen in _NOUNS}[a] for a in asked]
        assert len(set(noms)) == 4 and all(n in dict(pairs) for n in noms)
        values = [r["answer"][a:b] for a, b in r["answer_spans"]]
        assert values == [str(dict(pairs)[n]) for n in noms]
        assert r["distances"] == [6 - [k for k, _ in pairs].index(n) for n in noms]
        assert r["distance"] == r["distances"][0]
        # the text between the values is the next question, nothing else
        pieces = [r["answer"][b:a] for (_, b), (a, _) in zip(r["answer_spans"], r["answer_spans"][1:])]
        assert pieces == [f". Сколько у {a}? " for a in asked[1:]]
        seen.add(tuple(r["distances"]))
    assert len(seen) > 50  # the order of the queries is drawn per row


def test_kv_recall_queries_score_the_first_value_and_refuse_bad_options():
    t = get_task("kv_recall")
    assert t.score("8. Сколько у кота? 1", "8. Сколько у дома? 5")  # only the first value counts
    assert not t.score("7. Сколько у дома? 5", "8. Сколько у дома? 5")
    assert t.score(" 8 ", "8") and not t.score("8. Сколько", "8")  # one query: the whole answer
    with pytest.raises(Exception, match="queries=5 asks more pairs than n_pairs=4"):
        t.rows(1, 0, n_pairs=4, queries=5)
    with pytest.raises(Exception, match="use distance=0 with queries > 1"):
        t.rows(1, 0, n_pairs=4, queries=2, distance=1)


def test_a_prepared_multi_query_task_puts_the_loss_on_every_value_and_the_eos(tmp_path):
    from reflex_jax.data import TokenData, prepare_task
    prepare_task("kv_recall", str(tmp_path / "d"), n_train=20, n_val=4, verbose=False,
                 n_pairs=5, queries=3)
    d = TokenData.open(str(tmp_path / "d"))
    rows = get_task("kv_recall").rows(4, "0-val", n_pairs=5, queries=3)
    val = d.rows("val")
    assert len(val) == 4
    for (ids, m), r in zip(val, rows):
        supervised = bytes(int(i) for i, k in zip(ids, m) if k and i < 256).decode()
        assert supervised == "".join(r["answer"][a:b] for a, b in r["answer_spans"])
        assert m[-1] and ids[-1] == d.tokenizer().eos_id  # the eos is a target
        assert not m[0]  # bos is not
