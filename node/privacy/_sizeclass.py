"""Request size classes (``docs/protocol.md`` §6.3): the onion payload size a clove is padded to.

Why: the cloves of one request are about ``len(request) * n / k`` bytes in all, so an onion sized to its clove shows
every hop (and anyone on a link) the request's length to within 256 bytes, which links the ``n`` paths of a request
and fingerprints the request. Padding each onion to one of a few classes shows only the class. The padding goes in
the onion payload, not in the §4 envelope, so S-IDA (pure-Python GF(2^8)) never works on it: it costs AES-GCM per
hop only.
"""

from __future__ import annotations

from node.privacy._constants import REQUEST_CLASSES
from node.privacy._errors import InvalidPrivacyParam
from node.privacy._onion import padded_payload_len


def size_class(clove_len: int) -> int:
    """The §5.1 ``payload_len`` for a clove of ``clove_len`` bytes: the smallest of ``REQUEST_CLASSES`` holding it."""
    needed = padded_payload_len(clove_len)
    for size in REQUEST_CLASSES:
        if needed <= size:
            return size
    raise InvalidPrivacyParam("len(clove)", clove_len, f"at most {REQUEST_CLASSES[-1] - 4} bytes")
