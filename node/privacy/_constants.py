"""Every size, label and limit of the privacy protocol, each citing its section of ``docs/protocol.md``.

Kept in one module so that the spec and the code can be compared line by line.
"""

from __future__ import annotations

from typing import Final

#: §1, §2: version byte of every structure.
VERSION: Final = 0x01
#: §2: type bytes.
TYPE_CLOVE: Final = 0x01
TYPE_ONION: Final = 0x02
TYPE_REPLY: Final = 0x03
TYPE_ENVELOPE: Final = 0x04

#: §3: most cloves per message; ``2 <= k <= n <= MAX_N``.
MAX_N: Final = 16
#: §3: largest S-IDA plaintext (the §4 envelope), bytes.
MAX_MESSAGE: Final = 262_144
#: §3.1: bytes before the fragment in a clove.
CLOVE_HEADER_LEN: Final = 85
#: §3.1: field sizes.
MESSAGE_ID_LEN: Final = 16
KEY_LEN: Final = 32
NONCE_LEN: Final = 12
TAG_LEN: Final = 16

#: §4: envelope header (version, type, reply key, body length).
ENVELOPE_HEADER_LEN: Final = 38

#: §5.1: version byte of onion packets (version 2 added the key id and the header MAC; other structures stay 0x01).
ONION_VERSION: Final = 0x02
#: §5: routing slots per header (relays plus destination); the longest path.
MAX_HOPS: Final = 6
#: §5.2: bytes per routing slot.
SLOT_LEN: Final = 128
#: §5.1: routing bytes in every header.
ROUTING_LEN: Final = MAX_HOPS * SLOT_LEN
#: §5.1: recipient key id, ``SHA-256(node_pub)[0:8]``.
KEY_ID_LEN: Final = 8
#: §5.1: truncated HMAC-SHA256 over the header.
HEADER_MAC_LEN: Final = 16
#: §5.1: field offsets of the fixed header.
OFF_KEY_ID: Final = 2
OFF_EPH_PUB: Final = OFF_KEY_ID + KEY_ID_LEN
OFF_HEADER_MAC: Final = OFF_EPH_PUB + 32
OFF_PAYLOAD_TAG: Final = OFF_HEADER_MAC + HEADER_MAC_LEN
OFF_ROUTING: Final = OFF_PAYLOAD_TAG + TAG_LEN
OFF_PAYLOAD_LEN: Final = OFF_ROUTING + ROUTING_LEN
#: §5.1: fixed header bytes before the payload.
ONION_HEADER_LEN: Final = OFF_PAYLOAD_LEN + 4
#: §5.2: registry id of a node (the operator's 20-byte Ethereum address, as ``NodeRegistry`` keys nodes).
NODE_ID_LEN: Final = 20
#: §5.1: payload sizes.
PAYLOAD_QUANTUM: Final = 256
MAX_PAYLOAD: Final = 131_072
#: §5.1: the largest onion packet a hop accepts.
MAX_PACKET: Final = ONION_HEADER_LEN + MAX_PAYLOAD
#: §5.2: hop types.
HOP_FORWARD: Final = 0x01
HOP_EXIT: Final = 0x02
#: §5.4, §5.6: expiry window, seconds.
MAX_TTL: Final = 120
EXPIRY_GRANULARITY: Final = 10
#: §5.3: HKDF label and output split.
ONION_KDF_INFO: Final = b"planetserve/v2/onion"
ONION_OKM_LEN: Final = 144
REPLAY_TAG_LEN: Final = 16

#: §6.1: reply chunk sizes: every chunk is exactly ``REPLY_CHUNK_LEN`` bytes.
REPLY_HEADER_LEN: Final = 7
REPLY_CT_LEN: Final = 469
REPLY_CHUNK_LEN: Final = REPLY_HEADER_LEN + REPLY_CT_LEN + TAG_LEN
MAX_REPLY_DATA: Final = REPLY_CT_LEN - 4
REPLY_FLAG_FINAL: Final = 0x01
REPLY_FLAG_ERROR: Final = 0x02
#: §6.2: frame length prefix.
FRAME_LEN_BYTES: Final = 4
#: §6.2: per-link key and tag.
LINK_KEY_LEN: Final = 16
LINK_TAG_LEN: Final = 16
REPLY_LINK_INFO: Final = b"planetserve/v1/reply-link"
#: §6.2: label of the destination's per-path layer key.
REPLY_DEST_INFO: Final = b"planetserve/v1/reply-dest"
#: §6.2: the ``len`` of every reply frame, and every frame's size on the wire (512).
REPLY_FRAME_BODY: Final = REPLY_CHUNK_LEN + LINK_TAG_LEN
REPLY_FRAME_LEN: Final = FRAME_LEN_BYTES + REPLY_FRAME_BODY
#: §6.3: onion payload size classes of a request's cloves.
REQUEST_CLASSES: Final = (1024, 4096, 16_384, 65_536, 131_072)
