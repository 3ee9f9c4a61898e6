"""Built-in synthetic Russian tasks: generated from a seed, no files, no network.

Each task yields `{"question", "answer"}` rows that `prepare_task` renders with the same template
as real instruction data, and scores generated answers by exact match. `kv_recall` rows also carry
`"distance"` (an int, not rendered), which exact-match evaluation buckets by. They are the embedded
default of the tiny run and a memory benchmark (key-value recall at a chosen distance).

Lengths with the byte tokenizer and the default template (bos + "Вопрос: …\\n### Ответ: …" + eos),
at default options: `arith` 73-78 tokens, `kv_recall` 115-127 tokens (`mix`: either), so every row
fits block_size 128 (tests/test_tasks.py checks the bound).
"""
from __future__ import annotations

import random
from typing import Any, Callable

from ..errors import ConfigError, DataError

TASK_VERSION = 1  # bump when a generator changes, so that prepared task directories are rebuilt


def _parse_list(value, name: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = tuple(str(i).strip() for i in items if str(i).strip())
    if not items:
        raise ConfigError(f"task option {name} is empty; give at least one value.")
    return items


class Task:
    """A named generator of question/answer rows plus an exact-match scorer.

    Subclasses set `name`, `defaults` (the options and their default values) and `_row(rng, opts)`.
    """
    name = ""
    defaults: dict[str, Any] = {}

    def options(self, **options) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ConfigError(f"task {self.name!r} has no option {', '.join(unknown)}; its options are "
                              f"{', '.join(f'{k}={v!r}' for k, v in self.defaults.items())}.")
        opts = {**self.defaults, **options}
        self._check(opts)
        return opts

    def _check(self, opts: dict[str, Any]) -> None:
        pass

    def rows(self, n: int, seed: int, **options) -> list[dict[str, Any]]:
        """`n` rows, a pure function of (task, seed, options)."""
        opts = self.options(**options)
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"number of rows must be a non-negative integer, got {n!r}.")
        rng = random.Random(f"{self.name}:{seed}")  # str seeds hash stably across runs/platforms
        return [self._row(rng, opts) for _ in range(n)]

    def _row(self, rng: random.Random, opts: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def score(self, prediction: str, answer: str) -> bool:
        """Exact match after stripping surrounding whitespace."""
        return prediction.strip() == answer.strip()


def _int_option(opts: dict, name: str, low: int) -> int:
    value = opts[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"task option {name}={value!r} must be an integer >= {low}.")
    return value


class Arithmetic(Task):
    """"Сколько будет 17 плюс 25?" -> "42". Operands 0..max_operand; minus never goes negative
    unless allow_negative."""
    name = "arith"
    defaults = {"max_operand": 99, "ops": "plus,minus", "allow_negative": False}
    _OPS: dict[str, tuple[str, Callable[[int, int], int]]] = {
        "plus": ("плюс", lambda a, b: a + b),
        "minus": ("минус", lambda a, b: a - b),
        "times": ("умножить на", lambda a, b: a * b),
    }

    def _check(self, opts):
        _int_option(opts, "max_operand", 1)
        ops = _parse_list(opts["ops"], "ops")
        bad = [o for o in ops if o not in self._OPS]
        if bad:
            raise ConfigError(f"task option ops has unknown operation {', '.join(bad)}; "
                              f"use a comma list of {', '.join(self._OPS)}.")
        opts["ops"] = ops

    def _row(self, rng, opts):
        op = rng.choice(opts["ops"])
        a, b = rng.randint(0, opts["max_operand"]), rng.randint(0, opts["max_operand"])
        if op == "minus" and not opts["allow_negative"] and a < b:
            a, b = b, a
        word, fn = self._OPS[op]
        return {"question": f"Сколько будет {a} {word} {b}?", "answer": str(fn(a, b))}


# Short nouns with their genitive ("у кота"), so that the question is proper Russian and short.
_NOUNS = [
    ("кот", "кота"), ("дом", "дома"), ("лес", "леса"), ("сад", "сада"), ("сыр", "сыра"),
    ("кит", "кита"), ("жук", "жука"), ("лук", "лука"), ("мяч", "мяча"), ("сок", "сока"),
    ("рак", "рака"), ("нос", "носа"), ("суп", "супа"), ("бык", "быка"), ("лев", "льва"),
    ("ёж", "ежа"), ("пёс", "пса"), ("шар", "шара"), ("зуб", "зуба"), ("дуб", "дуба"),
    ("луг", "луга"), ("мёд", "мёда"), ("чай", "чая"), ("мост", "моста"), ("слон", "слона"),
    ("волк", "волка"), ("стол", "стола"), ("торт", "торта"), ("крот", "крота"), ("гриб", "гриба"),
    ("рыба", "рыбы"), ("луна", "луны"), ("гора", "горы"), ("река", "реки"), ("роза", "розы"),
    ("сова", "совы"), ("коза", "козы"), ("лиса", "лисы"), ("утка", "утки"), ("мышь", "мыши"),
    ("окно", "окна"), ("море", "моря"), ("поле", "поля"), ("небо", "неба"), ("мыло", "мыла"),
]


class KeyValueRecall(Task):
    """"Запомни: кот — 5, дом — 8, лес — 3. Сколько у дома?" -> "8".

    `n_pairs` distinct keys with values 0..max_value; the asked pair is `distance` pairs from the end
    (1 = the last one said, n_pairs = the first); distance 0 draws it uniformly per row. Each row
    records its distance in row["distance"].

    `queries` >= 2 asks that many distinct pairs in one row, in random order, each question followed
    by its answer (multi-query associative recall): the question holds the context and the first
    query, the answer "8. Сколько у кота? 5. Сколько у леса? 3", and row["answer_spans"] the
    [start, end) characters of each value in it, so that the loss falls on every value (and the
    closing eos) and on no query. row["distances"] lists each query's distance; row["distance"] is
    the first's (the one exact match scores, see `score`).
    """
    name = "kv_recall"
    defaults = {"n_pairs": 3, "distance": 0, "max_value": 9, "queries": 1}

    def _check(self, opts):
        n = _int_option(opts, "n_pairs", 1)
        if n > len(_NOUNS):
            raise ConfigError(f"task option n_pairs={n} exceeds the {len(_NOUNS)} distinct keys "
                              f"kv_recall knows; use n_pairs <= {len(_NOUNS)}.")
        d = _int_option(opts, "distance", 0)
        if d > n:
            raise ConfigError(f"task option distance={d} must be between 1 and n_pairs={n} "
                              "(or 0 for a random distance).")
        _int_option(opts, "max_value", 0)
        q = _int_option(opts, "queries", 1)
        if q > n:
            raise ConfigError(f"task option queries={q} asks more pairs than n_pairs={n} holds; use "
                              f"queries <= {n}.")
        if q > 1 and d:
            raise ConfigError(f"task option distance={d} fixes one asked pair, but queries={q} asks "
                              "several; use distance=0 with queries > 1.")

    def _row(self, rng, opts):
        n, q = opts["n_pairs"], opts["queries"]
        keys = rng.sample(_NOUNS, n)
        values = [rng.randint(0, opts["max_value"]) for _ in range(n)]
        pairs = ", ".join(f"{nom} — {v}" for (nom, _), v in zip(keys, values))
        if q == 1:
            distance = opts["distance"] or rng.randint(1, n)
            asked = n - distance
            return {"question": f"Запомни: {pairs}. Сколько у {keys[asked][1]}?",
                    "answer": str(values[asked]), "distance": distance}
        asked = rng.sample(range(n), q)
        answer, spans = "", []
        for j, i in enumerate(asked):
            if j:
                answer += f". Сколько у {keys[i][1]}? "
            spans.append([len(answer), len(answer) + len(str(values[i]))])
            answer += str(values[i])
        distances = [n - i for i in asked]
        return {"question": f"Запомни: {pairs}. Сколько у {keys[asked[0]][1]}?", "answer": answer,
                "answer_spans": spans, "distance": distances[0], "distances": distances}

    def score(self, prediction: str, answer: str) -> bool:
        """Exact match; of a multi-query row's first value only (the text before its first '.'),
        since a greedy continuation asks about keys of its own choosing after it."""
        if "." in answer:
            return prediction.split(".")[0].strip() == answer.split(".")[0].strip()
        return Task.score(self, prediction, answer)


class Mix(Task):
    """Both tasks, each row drawn from one of them with equal probability; options go to the task that
    has them (the tiny default run trains on this)."""
    name = "mix"

    def __init__(self, parts: tuple[Task, ...]):
        self.parts = parts
        self.defaults = {k: v for p in parts for k, v in p.defaults.items()}

    def options(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ConfigError(f"task 'mix' has no option {', '.join(unknown)}; its options are "
                              f"{', '.join(sorted(self.defaults))}.")
        # each part validates (and normalises) only the options it knows
        return [p.options(**{k: v for k, v in options.items() if k in p.defaults})
                for p in self.parts]

    def _row(self, rng, opts):
        i = rng.randrange(len(self.parts))
        return self.parts[i]._row(rng, opts[i])

    def score(self, prediction: str, answer: str) -> bool:
        # kv_recall's rule (a multi-query row: its first value); an arithmetic answer has no '.'
        return KeyValueRecall.score(self, prediction, answer)


_ARITH, _KV = Arithmetic(), KeyValueRecall()
TASKS: dict[str, Task] = {"arith": _ARITH, "kv_recall": _KV, "mix": Mix((_ARITH, _KV))}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; the built-in tasks are {', '.join(TASKS)}.")
    return TASKS[name]
