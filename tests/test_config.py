"""The reflex schedule resolves exactly as docs/attention.md says, and bad configs fail in one sentence."""
import dataclasses
import os

import pytest

from reflex_jax import ConfigError, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**kw):
    base = dict(n_layer=6, n_head=8, n_embd=64, vocab_size=100, block_size=16)
    base.update(kw)
    return ModelConfig(**base)


def test_all_6x8_table_newest_source_first():
    c = cfg(head_plan="all")
    assert c.schedule_table() == "all 6x8: 8 | 7+1 | 6+2 | 5+3 | 4+4 | 3+5"
    assert [g.source for g in c.layers[5].cross] == [4, 3, 2, 1, 0]
    # one head aimed at layer j reads j's last self head
    assert [g.source_heads for g in c.layers[5].cross] == [(3,), (4,), (5,), (6,), (7,)]
    assert c.kv_heads_total == 8 + 7 + 6 + 5 + 4 + 3


def test_recent_2_1_is_5_2_1_where_both_sources_exist():
    c = cfg(head_plan="recent:2,1")
    assert [p.n_self for p in c.layers] == [8, 6, 5, 5, 5, 5]
    assert [(g.source, g.n_heads) for g in c.layers[3].cross] == [(2, 2), (1, 1)]
    # layer 1 has only one earlier layer: 2 heads to layer 0, which exports its last 2 self heads
    assert c.layers[1].cross[0].source_heads == (6, 7)
    assert c.layers[3].cross[0].source_heads == (3, 4)  # layer 2 has 5 self heads


def test_none_is_vanilla():
    c = cfg(head_plan="none")
    assert all(p.n_self == 8 and not p.cross for p in c.layers)
    assert c.kv_heads_total == 48


def test_explicit_schedule_and_list_input():
    c = cfg(n_layer=3, head_plan=[[], [[0, 2]], [[0, 1], [1, 3]]])
    assert c.head_plan == ((), ((0, 2),), ((0, 1), (1, 3)))
    assert [p.n_self for p in c.layers] == [8, 6, 4]
    assert c.layers[2].cross[1].source_heads == (3, 4, 5)
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_all_deep_model_needs_window():
    with pytest.raises(ConfigError, match=r"layer 16 .*reflex_window <= 15"):
        cfg(n_layer=24, n_head=16, head_plan="all")
    c = cfg(n_layer=24, n_head=16, head_plan="all", reflex_window=15)
    assert min(p.n_self for p in c.layers) == 1
    assert [g.source for g in c.layers[23].cross] == list(range(22, 7, -1))
    with pytest.raises(ConfigError, match=r"reflex_window <= 12"):
        cfg(n_layer=24, n_head=16, head_plan="all", reflex_window=14, reflex_min_self=4)


@pytest.mark.parametrize("reflex, match", [
    (((), ((0, 9),), ()), r"layer 1 .*keeps -1 self heads"),
    (((), ((1, 1),), ()), r"layer 1 reads from layer 1, which is not an earlier layer"),
    (((), ((0, 7),), ((1, 2),)), r"layer 2 wants 2 heads of layer 1, which has only 1 self heads"),
    (((), ()), r"2 layer entries but n_layer=3"),
    (((), ((0, 0),), ()), r"layer 1 gives 0 heads"),
    ("recent:x", r"'recent:' needs non-negative head counts"),
    ("sometimes", r"model.head_plan='sometimes' is unknown"),
    (5, r"neither a preset"),
])
def test_invalid_schedules_name_the_layer(reflex, match):
    with pytest.raises(ConfigError, match=match):
        cfg(n_layer=3, head_plan=reflex)


def test_field_errors_are_one_sentence():
    with pytest.raises(ConfigError, match=r"did you mean 'n_head'"):
        ModelConfig.from_dict({"n_heads": 4})
    with pytest.raises(ConfigError, match=r"not divisible by model.n_head"):
        cfg(n_embd=30)
    with pytest.raises(ConfigError, match=r"model.dtype='float8' is not a supported dtype"):
        cfg(dtype="float8")
    with pytest.raises(ConfigError, match=r"model.norm='batchnorm' is unknown"):
        cfg(norm="batchnorm")


def test_dtype_names_and_objects_normalise():
    import jax.numpy as jnp
    assert cfg(dtype=jnp.bfloat16).dtype == "bfloat16"
    assert cfg(dtype="bf16").compute_dtype == jnp.bfloat16
    assert hash(cfg()) == hash(cfg())  # usable as a jit static argument


def test_model_differences_ignore_the_attention_backend():
    """Resuming decides by these fields: a backend switch is the same model, a size change is not."""
    base = ModelConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=16, block_size=8)
    assert base.model_differences(dataclasses.replace(base, attention="cudnn")) == []
    assert base.model_differences(dataclasses.replace(base, n_embd=16)) == ["n_embd"]
    assert base.model_differences(dataclasses.replace(base, head_plan="none", dtype="bfloat16")) == \
        ["dtype", "head_plan"]


# ---- explicit schedules from config files and the command line ---------------------------------

SCHEDULE_TEXT = "((),((0,1),),((1,1),(0,1)),((2,2),))"
SCHEDULE = ((), ((0, 1),), ((1, 1), (0, 1)), ((2, 2),))


def test_explicit_schedule_text_parses_into_tuples():
    c = cfg(n_layer=4, head_plan=SCHEDULE_TEXT)
    assert c.head_plan == SCHEDULE and c == cfg(n_layer=4, head_plan=SCHEDULE)
    assert c.schedule_table() == "explicit 4x8: 8 | 7+1 | 6+2 | 6+2"
    assert cfg(n_layer=2, head_plan=" [[], [[0, 3]]] ").head_plan == ((), ((0, 3),))
    assert ModelConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("text, match", [
    ("((),((0,1),)", r"^model.head_plan='\(\(\),\(\(0,1\),\)' is not a valid per-layer schedule; "
                     r"write one tuple of \(source_layer, n_heads\) pairs per layer, e.g. "
                     r"'\(\(\), \(\(0, 1\),\), \(\(1, 1\), \(0, 1\)\)\)' for 3 layers\.$"),
    ("((), (x, 1))", r"is not a valid per-layer schedule"),
    ("((0, 1),)", r"neither a preset .* such as '\(\(\), \(\(0, 1\),\)"),
    # text goes through the same validation as tuples, with the same sentences
    ("((), ((1, 1),), ())", r"layer 1 reads from layer 1, which is not an earlier layer"),
    ("((), ())", r"2 layer entries but n_layer=3"),
])
def test_bad_schedule_text_is_one_sentence(text, match):
    with pytest.raises(ConfigError, match=match):
        cfg(n_layer=3, head_plan=text)


def test_config_files_and_overrides_take_explicit_schedules(tmp_path):
    from reflex_jax.run_config import load_config, model_config_from
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    over = load_config(tiny, [("model.head_plan", SCHEDULE_TEXT)])
    assert model_config_from(over).head_plan == SCHEDULE
    assert model_config_from(load_config(tiny, [("model.head_plan", "recent:2,1")])).head_plan == "recent:2,1"
    for value in (repr(SCHEDULE), "[[], [[0, 1]], [[1, 1], [0, 1]], [[2, 2]]]"):
        path = tmp_path / "explicit.py"
        path.write_text(CONFIG_FILE.format(value=value))
        config = load_config(str(path))
        assert model_config_from(config).head_plan == SCHEDULE
        over = load_config(str(path), [("model.head_plan", "none")])  # a tuple field takes a preset
        assert model_config_from(over).head_plan == "none"
    path.write_text(CONFIG_FILE.format(value="5"))
    with pytest.raises(ConfigError, match=r"get_config\(\) of .*explicit.py' failed \(TypeError: "):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"layer 3 reads from layer 3"):
        model_config_from(load_config(tiny, [("model.head_plan", "((),(),(),((3,1),))")]))


CONFIG_FILE = """
from reflex_jax.run_config import base_config

def get_config():
    c = base_config()
    c.model.n_layer, c.model.n_head, c.model.n_embd = 4, 8, 64
    c.model.head_plan = {value}
    return c
"""


# ---- model.reflex: the old name of model.head_plan ------------------------------------------------

def test_reflex_is_an_alias_of_head_plan(tmp_path):
    """ModelConfig(reflex=...), from_dict of an older model_config.json, an older config file and
    --config.model.reflex all still set the head plan; both names with different plans refuse."""
    from reflex_jax.run_config import load_config, model_config_from
    assert cfg(reflex="recent:2,1") == cfg(head_plan="recent:2,1") == cfg(head_plan="recent:2,1",
                                                                           reflex="recent:2,1")
    assert dataclasses.replace(cfg(reflex="none"), dtype="bfloat16").head_plan == "none"
    old = {k: v for k, v in cfg(head_plan="cla:2").to_dict().items() if k != "head_plan"}
    assert ModelConfig.from_dict({**old, "reflex": "cla:2"}) == cfg(head_plan="cla:2")
    for make in (lambda: cfg(head_plan="all", reflex="none"),
                 lambda: ModelConfig.from_dict({**old, "head_plan": "all", "reflex": "none"})):
        with pytest.raises(ConfigError, match=r"^model.reflex='none' is the old name of "
                                              r"model.head_plan, which is 'all'; give the head plan "
                                              r"once, as model.head_plan.$"):
            make()
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    assert model_config_from(load_config(tiny, [("model.reflex", "none")])).head_plan == "none"
    path = tmp_path / "old.py"
    path.write_text(CONFIG_FILE.replace("c.model.head_plan", "c.model.reflex").format(value=repr(SCHEDULE)))
    assert model_config_from(load_config(str(path))).head_plan == SCHEDULE
    assert model_config_from(load_config(str(path), [("model.head_plan", "none")])).head_plan == "none"


@pytest.mark.parametrize("name, body, message", [
    ("cfg.yaml", "model:\n  n_layer: 4\n", "config file '{path}' is not a Python file; config files "
     "are .py files defining get_config() (see configs/tiny.py)."),
    ("cfg.py", "def get_config():\n    return 42\n", "get_config() of '{path}' returned int, not an "
     "ml_collections ConfigDict; return one (start from reflex_jax.run_config.base_config())."),
])
def test_odd_config_files_are_one_sentence(tmp_path, name, body, message):
    """Through train.py itself: a .yaml (importlib has no loader for it) and a get_config() that
    returns no ConfigDict ended in 44-line tracebacks."""
    import subprocess
    import sys
    path = tmp_path / name
    path.write_text(body)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "REFLEX_TUNE_MALLOC": "0"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train.py: error: " + message.format(path=path)
