"""Prefix-chunk hashing shared by the engine's KV cache, the node's advertised cache summary and client routing.

A prompt's token ids are cut into fixed chunks of :data:`CHUNK_TOKENS`; only full chunks count. Chunk ``i`` hashes to
``blake2b(hash[i-1] || tokens_le_u32, digest_size=8)`` with ``hash[-1] = MODEL_SALT`` (8 zero bytes unless the caller
salts by model), so equal hashes mean equal *whole prefixes*, not just equal chunks. Clients compute these locally;
routers compare them against a node's summary and never see the prompt. Pure and dependency-free by design.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

#: Tokens per chunk; a prefix is reusable only at multiples of this.
CHUNK_TOKENS = 16
#: Bytes in one chunk hash.
HASH_BYTES = 8
#: The chain's seed for an unsalted prompt.
ROOT = bytes(HASH_BYTES)


def chunk_hashes(token_ids: Sequence[int], *, salt: bytes = ROOT, limit: int | None = None) -> list[bytes]:
    """Chained hashes of the full chunks of ``token_ids`` (a trailing partial chunk is ignored).

    ``salt`` seeds the chain (use the model id's first 8 bytes to keep models apart); ``limit`` caps the number of
    chunks hashed, bounding the work for very long prompts.
    """
    if len(salt) != HASH_BYTES:
        raise ValueError(f"salt must be {HASH_BYTES} bytes")
    n_chunks = len(token_ids) // CHUNK_TOKENS
    if limit is not None:
        n_chunks = min(n_chunks, limit)
    out: list[bytes] = []
    prev = salt
    for i in range(n_chunks):
        prev = chain_hash(prev, token_ids[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS])
        out.append(prev)
    return out


def chain_hash(prev: bytes, chunk: Sequence[int]) -> bytes:
    """The hash of one full chunk after the chunk whose hash is ``prev`` (``ROOT`` for the first chunk).

    The engine's block cache calls this once per block as a sequence fills it, so a long generation never re-hashes
    its whole history.
    """
    if len(chunk) != CHUNK_TOKENS:
        raise ValueError(f"a chunk has exactly {CHUNK_TOKENS} tokens")
    return hashlib.blake2b(prev + struct.pack(f"<{CHUNK_TOKENS}I", *chunk), digest_size=HASH_BYTES).digest()


def longest_match(prompt_hashes: Sequence[bytes], cached: set[bytes] | frozenset[bytes]) -> int:
    """Number of leading chunks of a prompt whose chained hash is in ``cached`` (0 when none).

    Chaining makes a hit at chunk ``i`` imply the whole prefix up to ``i`` matches, so the scan goes from the longest
    prefix down and stops at the first hit.
    """
    for i in range(len(prompt_hashes), 0, -1):
        if prompt_hashes[i - 1] in cached:
            return i
    return 0
