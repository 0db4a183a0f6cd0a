"""GF(2^8) arithmetic (polynomial 0x11D, generator 2), vectorised with numpy tables (``docs/protocol.md`` §1).

A full 256x256 product table (64 KiB) turns "multiply a vector by a constant" into one fancy-indexing lookup, which is
what makes IDA fast in Python.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from node.privacy._errors import InvalidPrivacyParam

U8 = npt.NDArray[np.uint8]

_POLY: Final = 0x11D


def _build_tables() -> tuple[U8, U8, U8]:
    exp = np.zeros(512, dtype=np.uint8)
    log = np.zeros(256, dtype=np.uint8)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= _POLY
    exp[255:510] = exp[0:255]
    a = np.arange(256)
    la = log[a].astype(np.int64)
    table = exp[(la[:, None] + la[None, :]) % 255].astype(np.uint8)
    table[0, :] = 0
    table[:, 0] = 0
    return exp, log, table


EXP, LOG, MUL = _build_tables()


def mul(a: int, b: int) -> int:
    """Product of two field elements."""
    return int(MUL[a, b])


def inv(a: int) -> int:
    """Multiplicative inverse; 0 has none."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(EXP[255 - int(LOG[a])])


def power(a: int, e: int) -> int:
    """``a ** e`` in the field (``0 ** 0 == 1``)."""
    if e == 0:
        return 1
    if a == 0:
        return 0
    return int(EXP[(int(LOG[a]) * e) % 255])


def vandermonde(xs: list[int], k: int) -> list[list[int]]:
    """Rows ``[x^0, x^1, ..., x^(k-1)]`` for each evaluation point."""
    return [[power(x, j) for j in range(k)] for x in xs]


def invert_matrix(m: list[list[int]]) -> list[list[int]]:
    """Gauss-Jordan inverse of a square matrix over GF(2^8); raises on a singular matrix."""
    size = len(m)
    a = [[*row, *(1 if i == j else 0 for j in range(size))] for i, row in enumerate(m)]
    for col in range(size):
        pivot = next((r for r in range(col, size) if a[r][col] != 0), None)
        if pivot is None:
            raise InvalidPrivacyParam("matrix", "singular", "an invertible matrix (distinct indices)")
        a[col], a[pivot] = a[pivot], a[col]
        f = inv(a[col][col])
        a[col] = [mul(f, v) for v in a[col]]
        for r in range(size):
            if r != col and a[r][col] != 0:
                g = a[r][col]
                row_c = a[col]
                a[r] = [v ^ mul(g, c) for v, c in zip(a[r], row_c, strict=True)]
    return [row[size:] for row in a]


def matmul_rows(coeffs: list[list[int]], rows: U8) -> U8:
    """``out[i] = XOR_j coeffs[i][j] * rows[j]`` for byte vectors ``rows[j]`` (shape ``(k, L)``)."""
    out = np.zeros((len(coeffs), rows.shape[1]), dtype=np.uint8)
    for i, crow in enumerate(coeffs):
        acc = out[i]
        for j, c in enumerate(crow):
            if c == 1:
                acc ^= rows[j]
            elif c != 0:
                acc ^= MUL[c][rows[j]]
    return out
