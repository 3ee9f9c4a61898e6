"""What a conversion did, tensor by tensor: the report rows and the writer that records them
while it fills the target's flat parameter tree."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np

from ..errors import ConvertError


@dataclasses.dataclass
class Row:
    status: str        # copied | sliced | constant | new | dropped
    target: str        # target param path ('' for dropped source tensors)
    source: str        # source tensor and slice ('' for new)
    n_params: int      # target elements written (for dropped: source elements unused)


@dataclasses.dataclass
class Report:
    source: str
    target: str
    layers: list[int]
    rows: list[Row]
    notes: list[str]
    source_layer: str = "h"    # source layer j's tensors are `{source_layer}.{j}.*`

    def totals(self) -> dict[str, int]:
        out = {s: 0 for s in ("copied", "sliced", "constant", "new", "dropped")}
        for r in self.rows:
            out[r.status] += r.n_params
        return out

    def table(self) -> str:
        """Rows grouped over layers (h_{i} <- h.{j}, with i -> j as in the `layers` line)."""
        groups: dict[tuple, list] = {}
        src = self.source_layer
        for r in self.rows:
            key = (r.status, re.sub(r"^h_\d+\.", "h_{i}.", r.target),
                   re.sub(rf"^{src}\.\d+\.", src + ".{j}.", r.source))
            groups.setdefault(key, []).append(r.n_params)
        lines = [f"source: {self.source}", f"target: {self.target}",
                 "layers: " + ", ".join(f"h_{i} <- {src}.{j}" for i, j in enumerate(self.layers)),
                 "", "| status | params | target | source |", "|---|---:|---|---|"]
        order = {"copied": 0, "sliced": 1, "constant": 2, "new": 3, "dropped": 4}
        for (status, target, source), counts in sorted(groups.items(), key=lambda kv: order[kv[0][0]]):
            n = f"{sum(counts):,}" + (f" ({len(counts)}x)" if len(counts) > 1 else "")
            lines.append(f"| {status} | {n} | {target or '-'} | {source or '-'} |")
        t = self.totals()
        written = t["copied"] + t["sliced"] + t["constant"] + t["new"]
        lines += ["", f"target params {written:,}: copied {t['copied']:,}, sliced {t['sliced']:,}, "
                  f"constant {t['constant']:,}, new {t['new']:,}; source params dropped "
                  f"{t['dropped']:,}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class ParamWriter:
    """Fills the flat target tree and records every row of the report."""

    def __init__(self, source, flat: dict):
        self.source, self.flat, self.rows = source, flat, []
        self.written: set[str] = set()
        # per source tensor: a 1-D mask over the axis that gets sliced, to count unused elements
        self.used: dict[str, tuple[int, np.ndarray]] = {}

    def mark(self, name: str, axis: int = 0, start: int = 0, stop: Optional[int] = None) -> None:
        shape = self.source.tensor(name).shape
        ax, mask = self.used.setdefault(name, (axis, np.zeros(shape[axis], bool)))
        if ax != axis:  # used along two different axes: count the tensor as fully used
            mask[:] = True
            return
        mask[start:stop] = True

    def put(self, target: str, value: np.ndarray, status: str, source_desc: str) -> None:
        leaf = self.flat[target]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ConvertError(f"source {source_desc} gives shape {tuple(value.shape)} but target "
                               f"parameter {target} has shape {tuple(leaf.shape)}; the configs differ "
                               "in a size the mapping cannot bridge.")
        self.flat[target] = np.asarray(value, np.float32).astype(leaf.dtype)
        self.written.add(target)
        self.rows.append(Row(status, target, source_desc, int(value.size)))

    def params(self, cfg, seed: int):
        """The params tree: what was put, freshly initialised values (from `seed`) for the rest."""
        import jax
        from flax import traverse_util
        from ..model import init_params
        if len(self.written) < len(self.flat):
            fresh = jax.jit(lambda key: init_params(cfg, key))(jax.random.PRNGKey(seed))
            for key, value in traverse_util.flatten_dict(fresh).items():
                if ".".join(key) not in self.written:
                    self.flat[".".join(key)] = value
        return traverse_util.unflatten_dict({tuple(k.split(".")): jax.numpy.asarray(v)
                                             for k, v in self.flat.items()})

    def finish(self) -> None:
        for target, leaf in self.flat.items():
            if target not in self.written:
                self.rows.append(Row("new", target, "", int(np.prod(leaf.shape))))
        for name, t in self.source.tensors.items():
            if name not in self.used:
                self.rows.append(Row("dropped", "", name, int(t.size)))
                continue
            axis, mask = self.used[name]
            unused = int(t.size // t.shape[axis] * (~mask).sum())
            if unused:
                self.rows.append(Row("dropped", "", f"{name} (unused part)", unused))
