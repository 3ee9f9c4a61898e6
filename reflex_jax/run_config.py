"""The one config mechanism of every script: ml_collections config files plus overrides.

A config file (`configs/*.py`) defines `get_config()`, starting from `base_config()` here. Every
field can be overridden from the command line, `--config.model.n_layer=12`: `split_overrides`
reads those words and `load_config` applies them, type-checked against the file's fields, with a
did-you-mean for typos. Optional fields use placeholders so that the command line can set them
despite a None default.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

from ml_collections import ConfigDict, config_dict

from .errors import ConfigError, ReflexError, UsageError
from .model.config import ModelConfig


HEAD_PLAN_TYPES = (str, tuple, list)  # model.head_plan: a preset name or explicit per-layer tuples


def model_config_dict(**overrides) -> ConfigDict:
    d = ModelConfig().to_dict()
    d["reflex"] = None  # model.head_plan's old name; when set, it is the head plan
    d.update(overrides)
    # the field takes either form; a command line gives the tuples as text, ModelConfig parses it
    for name in ("head_plan", "reflex"):
        if not isinstance(d[name], config_dict.FieldReference):
            d[name] = config_dict.FieldReference(d[name], field_type=HEAD_PLAN_TYPES)
    m = ConfigDict(d)
    for name, kind in (("mlp_hidden", int), ("reflex_window", int)):
        if m[name] is None:
            m[name] = config_dict.placeholder(kind)
    return m


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.model = model_config_dict()

    c.data = ConfigDict()
    c.data.dir = ""                # prepared token directory (python -m reflex_jax.data prepare)
    c.data.task = ""               # or a built-in task name (reflex_jax.data.tasks), generated, no files
    c.data.tokenizer = "bytes"     # for built-in tasks; prepared dirs name their own tokenizer
    c.data.loss_on = "all"         # all | answer (answer-only loss when the data has a mask)
    c.data.document_mask = True    # packed windows: tokens attend only within their row / file
    c.data.prefetch = 1            # batches read and placed ahead of the step (0: in the step's path)
    c.data.task_rows = 20000       # built-in tasks: rows generated for training
    c.data.task_val_rows = 256
    c.data.resume_on_changed_data = False  # resume although the data's fingerprint changed
    # every built-in task option with its default, so the command line can set any of them
    # (--config.data.task_options.n_pairs=4); a task receives only the options it has
    from .data.tasks import TASKS
    c.data.task_options = ConfigDict(TASKS["mix"].defaults)

    c.optim = ConfigDict()
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-5
    c.optim.warmup_steps = 400
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = False
    c.optim.clip = 1.0

    c.mesh = ConfigDict()
    c.mesh.data = -1               # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.run_dir = "runs/default"
    c.init_from = ""               # converted params dir or run dir to start from

    # LoRA (train/lora.py): rank > 0 trains low-rank adapters on the frozen init_from params
    c.lora = ConfigDict()
    c.lora.rank = 0                # 0: off (every param is trained)
    c.lora.alpha = 16.0            # the adapters are scaled by alpha / rank
    c.lora.targets = "q,kv,o,mlp"  # comma-separated: q, k, v, kv (= k,v), o, mlp

    c.seed = 0
    # the dropout keys' generator (jax's names): threefry2x32 | rbg | unsafe_rbg (rbg kinds use
    # the TPU's hardware generator: a faster compile, other masks; docs/training.md)
    c.rng_impl = "threefry2x32"
    c.max_steps = 1000
    c.batch_size = 8               # global sequences per optimizer step
    c.grad_accum = 1               # micro-batches per step (batch_size must divide by it)
    # rematerialisation policy (model/remat.py): none | block | nothing_saveable | dots_saveable |
    # offload; True/False mean block/none
    c.remat = config_dict.FieldReference(False, field_type=(bool, str))
    c.eval_interval = 200
    c.eval_batches = 8
    c.eval_exact_match = 64        # built-in tasks: rows scored by greedy generation at eval
    c.eval_tasks = ""              # lm-eval tasks scored on the live params, comma-separated
    c.eval_tasks_interval = 0      # every this many steps and at the last (0: off)
    c.eval_task_paths = ""         # directories of task YAMLs, comma-separated
    c.eval_tasks_limit = 0.0       # documents per task (0: all; below 1: a fraction)
    c.log_interval = 10
    c.checkpoint_interval = 500
    c.checkpoint_minutes = 0.0     # also save when this many minutes passed since the last save
    c.profile_steps = ""           # "START:END": a jax.profiler trace of steps START+1..END
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.tensorboard = False
    c.wandb = False
    return c


def model_config_from(config: ConfigDict) -> ModelConfig:
    """The validated ModelConfig of an ml_collections config (errors name the field)."""
    return ModelConfig.from_dict(model_fields(config.model.to_dict()))


def model_fields(model: dict) -> dict:
    """A config's model section (or a stored run's config.json "model") with model.reflex, the
    old name of model.head_plan, folded in: when set (a config built in code, an older run's
    config.json), it is the head plan."""
    d = dict(model)
    alias = d.pop("reflex", None)
    if alias is not None:
        d["head_plan"] = alias
    return d


# ---- config file + `--config.a.b=v` overrides ------------------------------------------------------

def load_config(path: str, overrides: Sequence[tuple[str, str]] = ()) -> ConfigDict:
    """`get_config()` of an ml_collections config file, with `(dotted.key, raw value)` overrides
    applied and type-checked against the file's fields."""
    file, _, arg = path.partition(":")
    if not file:
        raise ConfigError("no config file given; pass --config configs/tiny.py (or another file "
                           "with get_config()).")
    if not os.path.isfile(file):
        raise ConfigError(f"config file {file!r} does not exist; pass --config with an existing file "
                           "such as configs/tiny.py.")
    if not file.endswith(".py"):  # importlib finds no loader for other suffixes (spec None)
        raise ConfigError(f"config file {file!r} is not a Python file; config files are .py files "
                          "defining get_config() (see configs/tiny.py).")
    spec = importlib.util.spec_from_file_location(f"_reflex_config_{abs(hash(file))}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file; name it and the error
        raise ConfigError(f"config file {file!r} failed to load ({type(e).__name__}: {e}); fix "
                           "the file.") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {file!r} has no get_config() function; config files "
                           "define get_config() returning an ml_collections ConfigDict.")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ReflexError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a value of the wrong type for a field
        raise ConfigError(f"get_config() of {file!r} failed ({type(e).__name__}: {e}); fix the "
                           "file.") from None
    if not isinstance(config, ConfigDict):  # anything else fails later, far from the file
        raise ConfigError(f"get_config() of {file!r} returned {type(config).__name__}, not an "
                          "ml_collections ConfigDict; return one (start from "
                          "reflex_jax.run_config.base_config()).")
    _fold_reflex(config)  # an older file's model.reflex
    for key, raw in overrides:
        apply_override(config, key, raw)
    return config


def _fold_reflex(config: ConfigDict) -> None:
    """model.reflex (head_plan's old name), when set, moves to model.head_plan: what the config's
    readers see is model.head_plan."""
    model = config.get("model")
    if isinstance(model, ConfigDict) and model.get("reflex") is not None:
        model.head_plan, model.reflex = model.reflex, None


def split_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """`--config.a.b=v` / `--config.a.b v` command-line words -> [("a.b", "v")]; anything else is
    a mistake named in one sentence."""
    out, i = [], 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--config."):
            raise UsageError(f"unknown argument {word!r}; config fields are set with "
                             "--config.<field>=<value> (e.g. --config.max_steps=300).")
        key, eq, value = word[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UsageError(f"{word} has no value; write {word}=<value>.")
            value, i = args[i + 1], i + 1
        out.append((key, value))
        i += 1
    return out


def model_overrides(args: Sequence[str]) -> dict[str, Any]:
    """`--config.model.<field>=v` words -> {field: typed value}, checked against the model section
    of the base config (for tools whose architecture comes from a checkpoint, not a config file)."""
    config, out = base_config(), {}
    for key, raw in split_overrides(args):
        if not key.startswith("model."):
            raise UsageError(f"--config.{key}: only --config.model.<field> overrides apply here "
                             "(the rest of the config is for training).")
        apply_override(config, key, raw)
        key = _ALIASES.get(key, key)
        out[key[len("model."):]] = _field(config, key)[0][key.rsplit(".", 1)[1]]
    return out


def _field(config: ConfigDict, key: str):
    """(parent ConfigDict, leaf name) of a dotted key, with a did-you-mean for typos."""
    *path, leaf = key.split(".")
    node, walked = config, []
    for part in path + [leaf]:
        if not isinstance(node, ConfigDict) or part not in node:
            known = list(node.keys()) if isinstance(node, ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            where = ".".join(walked) or "the config"
            hint = f"; did you mean '{'.'.join(walked + [close[0]])}'?" if close else (
                f"; {where} has {', '.join(known)}." if known else ".")
            raise ConfigError(f"unknown config field '{key}'{hint}")
        parent, node = node, node[part]
        walked.append(part)
    return parent, leaf


_ALIASES = {"model.reflex": "model.head_plan"}  # old name -> the field it sets


def apply_override(config: ConfigDict, key: str, raw: str) -> None:
    key = _ALIASES.get(key, key)
    parent, leaf = _field(config, key)
    if isinstance(parent[leaf], ConfigDict):
        raise ConfigError(f"config field '{key}' is a group, not a value; set one of its fields, "
                           f"e.g. --config.{key}.{next(iter(parent[leaf].keys()), 'x')}=...")
    kind = parent.get_type(leaf)
    parent[leaf] = _parse_value(key, raw, kind)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a tuple", list: "a list"}


def _parse_value(key: str, raw: str, kind) -> Any:
    raw = str(raw)
    if isinstance(kind, tuple) and str in kind:  # a field of several types (model.head_plan): the
        return raw                               # text as typed, its consumer parses it
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        if kind in (tuple, list):
            value = ast.literal_eval(raw)
            if not isinstance(value, (tuple, list)):
                raise ValueError
            return kind(value)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config field '{key}' takes {_TYPE_NAMES.get(kind, kind.__name__)}, "
                          f"got {raw!r}.") from None
    try:  # a field whose default is None: a Python literal if it is one, else the string
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def flatten_config(d, prefix: str = "") -> dict:
    """Nested dicts (a config's to_dict(), a config.json) -> {'a.b': leaf}."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}
