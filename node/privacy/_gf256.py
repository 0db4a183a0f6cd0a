"""GF(2^8) arithmetic (polynomial 0x11D, generator 2), vectorised with numpy tables (``docs/protocol.md`` §1).

Why tables: a product of two bytes is one lookup in a 256x256 table (64 KiB, built once from the log/antilog
tables), so a whole matrix product ``coeffs (m x k) · rows (k x L)`` is **one** fancy-indexing gather of ``m·k·L``
products followed by ``k-1`` vector XORs, instead of ``m·k`` Python-level row operations. Vandermonde matrices and
their inverses depend only on the index set, so :func:`vandermonde_matrix` and :func:`inverse_vandermonde` cache
them (bounded LRU): a model node rebuilding many messages over the same ``k`` paths inverts once.
"""

from __future__ import annotations

import functools
from typing import Final

import numpy as np
import numpy.typing as npt

from node.privacy._errors import InvalidPrivacyParam

U8 = npt.NDArray[np.uint8]

_POLY: Final = 0x11D
#: Cached matrices: the number of index sets of at most ``MAX_N = 16`` points is far larger than any node sees.
_CACHE_ENTRIES: Final = 4096


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
    for t in (exp, log, table):
        t.flags.writeable = False
    return exp, log, table


EXP, LOG, MUL = _build_tables()
#: ``MUL`` flattened: the product ``a·b`` is ``_FLAT[a << 8 | b]``.
_FLAT: Final = MUL.reshape(-1)


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


def _index_matrix(m: list[list[int]]) -> npt.NDArray[np.intp]:
    """``coeff << 8`` per entry, shaped ``(m, k, 1)``: OR-ing a byte row into it gives indices into ``_FLAT``."""
    arr = np.array(m, dtype=np.intp).reshape(len(m), -1, 1) << 8
    arr.flags.writeable = False
    return arr


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def vandermonde_matrix(xs: tuple[int, ...], k: int) -> npt.NDArray[np.intp]:
    """The Vandermonde matrix of ``xs`` (``len(xs) x k``) in :func:`matmul`'s index form; cached."""
    return _index_matrix(vandermonde(list(xs), k))


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def inverse_vandermonde(xs: tuple[int, ...]) -> npt.NDArray[np.intp]:
    """The inverse of the square Vandermonde matrix of distinct points ``xs`` in :func:`matmul`'s index form; cached."""
    return _index_matrix(invert_matrix(vandermonde(list(xs), len(xs))))


def matmul(coeffs: npt.NDArray[np.intp], rows: U8) -> U8:
    """``out[i] = XOR_j coeffs[i][j] · rows[j]`` for byte rows ``rows`` (shape ``(k, L)``).

    ``coeffs`` comes from :func:`vandermonde_matrix` or :func:`inverse_vandermonde`: one gather of every product,
    then an XOR over ``j``.
    """
    products: U8 = _FLAT[coeffs | rows[None, :, :]]
    out: U8 = products[:, 0].copy()
    for j in range(1, products.shape[1]):
        out ^= products[:, j]
    return out


def matmul_rows(coeffs: list[list[int]], rows: U8) -> U8:
    """:func:`matmul` for a matrix given as nested lists (not cached; tests and one-off use)."""
    return matmul(_index_matrix(coeffs), rows)
