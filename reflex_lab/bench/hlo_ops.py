"""What each instruction of a compiled XLA module is: opcode, op_name metadata, matmul FLOPs and
bytes moved, read from the optimized HLO text (`compiled.as_text()`).

A profile of XLA:CPU names every executed thunk after its HLO instruction, so this table turns
per-thunk times into per-site times and achieved GFLOP/s. Fusions count the dots inside them.
"""
from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \((.*)\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_PARAM = re.compile(r"([\w.\-]+): ((?:pred|[suf]\d+|bf16|c64|c128)\[[\d,]*\])")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_OPERAND = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass
class HloOp:
    name: str
    opcode: str
    op_name: str        # the JAX name stack, e.g. jit(f)/transpose(jvp(Decoder))/h_0/attn/q/...
    flops: int          # matmul FLOPs of one execution (dots, also inside a fusion)
    bytes: int          # bytes of its array operands and result (one execution)
    computation: str


def _dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(text)]


def _nbytes(shapes) -> int:
    return sum(_DTYPE_BYTES.get(t, 4) * math.prod(d) for t, d in shapes)


def _dot_flops(out_shape, rest: str, shapes: dict) -> int:
    operands = _OPERAND.findall(rest.split(")", 1)[0])
    contract = _CONTRACT.search(rest)
    if not operands or contract is None or operands[0] not in shapes:
        return 0
    lhs = shapes[operands[0]][1]
    k = math.prod(lhs[int(i)] for i in contract.group(1).split(",") if i)
    return 2 * math.prod(out_shape) * k


def parse_hlo(text: str) -> dict[str, HloOp]:
    """Every instruction of every computation, by (module-unique) name."""
    ops: dict[str, HloOp] = {}
    comp_flops: dict[str, int] = {}
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (dtype, dims), per computation
    comp = ""
    pending: list[tuple[HloOp, str]] = []  # fusions: their flops come from the called computation
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            comp, shapes = m.group(1), {}
            for name, shape in _PARAM.findall(m.group(2)):
                shapes[name] = _dims(shape)[0]
            comp_flops.setdefault(comp, 0)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, type_text, opcode, rest = m.groups()
        out = _dims(type_text)
        if out:
            shapes[name] = out[0]
        flops = _dot_flops(out[0][1], rest, shapes) if opcode == "dot" and out else 0
        comp_flops[comp] = comp_flops.get(comp, 0) + flops
        operand_text = rest.split(")", 1)[0]
        in_shapes = [shapes[o] for o in _OPERAND.findall(operand_text) if o in shapes]
        op_name = _OP_NAME.search(rest)
        op = HloOp(name, opcode, op_name.group(1) if op_name else "", flops,
                   _nbytes(out) + _nbytes(in_shapes), comp)
        ops[name] = op
        called = _CALLS.search(rest)
        if opcode == "fusion" and called:
            pending.append((op, called.group(1)))
    for op, called in pending:
        op.flops = comp_flops.get(called, 0)
    return ops

