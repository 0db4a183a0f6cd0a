"""The vectorised GF(2^8) matrix product and the cached inverse matrices agree with the field's scalar definition."""

from __future__ import annotations

import random

import numpy as np

from node.privacy import _gf256 as gf


def _scalar_product(coeffs: list[list[int]], rows: list[bytes]) -> list[bytes]:
    out = []
    for crow in coeffs:
        acc = bytearray(len(rows[0]))
        for c, row in zip(crow, rows, strict=True):
            for b, v in enumerate(row):
                acc[b] ^= gf.mul(c, v)
        out.append(bytes(acc))
    return out


def test_matmul_equals_the_scalar_definition_on_random_matrices() -> None:
    rng = random.Random(9)
    for _ in range(40):
        m, k, length = rng.randrange(1, 17), rng.randrange(1, 9), rng.randrange(1, 300)
        coeffs = [[rng.randrange(256) for _ in range(k)] for _ in range(m)]
        rows = [rng.randbytes(length) for _ in range(k)]
        got = gf.matmul_rows(coeffs, np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(k, length))
        assert [r.tobytes() for r in got] == _scalar_product(coeffs, rows)


def test_cached_inverse_vandermonde_inverts_for_every_index_set_of_a_message() -> None:
    rng = random.Random(10)
    for _ in range(30):
        k = rng.randrange(2, 9)
        xs = tuple(sorted(rng.sample(range(1, 17), k)))
        identity = np.eye(k, dtype=np.uint8)
        product = gf.matmul(gf.inverse_vandermonde(xs), np.array(gf.vandermonde(list(xs), k), dtype=np.uint8))
        assert (product == identity).all()
        assert gf.inverse_vandermonde(xs) is gf.inverse_vandermonde(xs)  # cached, not recomputed


def test_cached_matrices_are_read_only() -> None:
    matrix = gf.vandermonde_matrix((1, 2, 3), 3)
    assert not matrix.flags.writeable and not gf.MUL.flags.writeable
