"""PlanetServe's shared kernel: what every layer (``ledger``, ``node``, ``verifier``, ``cli``) may import and
which imports none of them: the root error and the value types every layer shares (model id, wei, address).

Dependency-free by design: importing it loads only the standard library; keccak (pycryptodome, a core
dependency) is imported the first time an id or checksum is computed.
"""

from planetserve._address import Address, address_bytes, parse_address
from planetserve._errors import InvalidValue, PlanetServeError
from planetserve._keccak import keccak256
from planetserve._model_id import ModelId, is_model_name
from planetserve._wei import Wei, format_eth, parse_eth

__all__ = [
    "Address",
    "InvalidValue",
    "ModelId",
    "PlanetServeError",
    "Wei",
    "address_bytes",
    "format_eth",
    "is_model_name",
    "keccak256",
    "parse_address",
    "parse_eth",
]
