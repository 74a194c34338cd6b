"""LLVM constants for large tables, formatted as text once.

llvmlite formats an array constant element by element through Python objects (`ir.Constant` per
value, `get_reference` per value): about 2 microseconds an element, which is seconds for the tables
of a 10,000-rule policy and most of the compile time of a 100-rule one. These helpers format the
same IR text directly (about 0.2 microseconds an element) as an `ir.FormattedConstant`, which
llvmlite inserts verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence

from llvmlite import ir


def int_array(typ: ir.IntType, values: Sequence[int]) -> ir.Constant:
    """`[N x iW] [iW v0, iW v1, ...]`; values must fit the width (unsigned or signed)."""
    array_t = ir.ArrayType(typ, len(values))
    if not values:
        return ir.Constant(array_t, [])
    if typ.width == 8:
        return ir.Constant(array_t, bytearray(v & 0xFF for v in values))
    prefix = f"i{typ.width} "
    return ir.FormattedConstant(array_t, "[" + ", ".join(prefix + str(v) for v in values) + "]")


def word_rows(row_t: ir.ArrayType, rows: Sequence[Sequence[int]]) -> ir.Constant:
    """`[N x [W x i64]]` from rows of W words each."""
    array_t = ir.ArrayType(row_t, len(rows))
    if not rows:
        return ir.Constant(array_t, [])
    elem = str(row_t.element)
    inner = str(row_t)
    text = ", ".join(f"{inner} [" + ", ".join(f"{elem} {v}" for v in row) + "]" for row in rows)
    return ir.FormattedConstant(array_t, "[" + text + "]")


__all__ = ["int_array", "word_rows"]
