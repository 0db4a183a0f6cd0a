"""Our one-shot AES-GCM and AES-CTR (on ``cryptography``) must equal pycryptodome's public ``AES.new`` modes byte
for byte, and reject forgeries."""

from __future__ import annotations

import pytest
from Crypto.Cipher import AES
from hypothesis import given, settings
from hypothesis import strategies as st

from node.privacy._aes import (
    AuthenticationFailed,
    ctr_keystream,
    ctr_xor,
    gcm_open,
    gcm_seal,
    xor_bytes,
)
from node.privacy._constants import MAX_MESSAGE

KEYS = st.binary(min_size=32, max_size=32)
#: Sizes around block boundaries matter most; hypothesis also draws arbitrary ones.
SIZES = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 31, 32, 33, 255, 256, 257]), st.integers(0, 20_000))


def _reference_gcm(key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=16)
    cipher.update(aad)
    return cipher.encrypt_and_digest(plaintext)


@settings(max_examples=150, deadline=None)
@given(key=KEYS, nonce=st.binary(min_size=12, max_size=12), aad_len=st.integers(0, 900), size=SIZES, data=st.data())
def test_gcm_matches_pycryptodome_and_round_trips(
    key: bytes, nonce: bytes, aad_len: int, size: int, data: st.DataObject
) -> None:
    aad = data.draw(st.binary(min_size=aad_len, max_size=aad_len))
    plaintext = data.draw(st.binary(min_size=size, max_size=size))
    sealed = gcm_seal(key, nonce, aad, plaintext)
    assert sealed == _reference_gcm(key, nonce, aad, plaintext)
    assert gcm_open(key, nonce, aad, *sealed) == plaintext


@settings(max_examples=100, deadline=None)
@given(key=KEYS, nonce=st.binary(min_size=8, max_size=8), size=SIZES, data=st.data())
def test_ctr_matches_pycryptodome(key: bytes, nonce: bytes, size: int, data: st.DataObject) -> None:
    plaintext = data.draw(st.binary(min_size=size, max_size=size))
    reference = AES.new(key, AES.MODE_CTR, nonce=nonce, initial_value=0).encrypt(plaintext)
    assert ctr_xor(key, nonce, plaintext) == reference
    assert ctr_xor(key, nonce, reference) == plaintext


def test_ctr_keystream_from_a_later_counter_matches_pycryptodome() -> None:
    key, nonce = bytes(range(32)), b"\x01" * 8
    reference = AES.new(key, AES.MODE_CTR, nonce=nonce, initial_value=5).encrypt(bytes(100))
    assert ctr_keystream(key, nonce, 100, initial_value=5) == reference


def test_the_largest_message_matches_pycryptodome() -> None:
    key, nonce, plaintext = b"k" * 32, b"n" * 12, bytes(range(256)) * (MAX_MESSAGE // 256)
    assert gcm_seal(key, nonce, b"aad", plaintext) == _reference_gcm(key, nonce, b"aad", plaintext)


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 600), where=st.integers(0, 10**6), field=st.sampled_from(["aad", "ct", "tag", "nonce"]))
def test_any_flipped_bit_fails_authentication(size: int, where: int, field: str) -> None:
    key, nonce, aad = b"K" * 32, b"N" * 12, b"header bytes"
    parts = {"aad": bytearray(aad), "nonce": bytearray(nonce)}
    ciphertext, tag = gcm_seal(key, nonce, aad, bytes(size))
    parts["ct"], parts["tag"] = bytearray(ciphertext), bytearray(tag)
    target = parts[field]
    bit = where % (len(target) * 8)
    target[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationFailed):
        gcm_open(key, bytes(parts["nonce"]), bytes(parts["aad"]), bytes(parts["ct"]), bytes(parts["tag"]))


@pytest.mark.parametrize("tag", [b"", b"\x00" * 15, b"\x00" * 17])
def test_a_tag_of_the_wrong_length_fails(tag: bytes) -> None:
    ciphertext, _ = gcm_seal(b"K" * 32, b"N" * 12, b"", b"hello")
    with pytest.raises(AuthenticationFailed):
        gcm_open(b"K" * 32, b"N" * 12, b"", ciphertext, tag)


def test_wrong_nonce_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        gcm_seal(b"K" * 32, b"N" * 16, b"", b"x")
    with pytest.raises(ValueError, match="8 bytes"):
        ctr_xor(b"K" * 32, b"N" * 12, b"x")


def test_oversized_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="too long"):
        gcm_seal(b"K" * 32, b"N" * 12, b"", bytes(MAX_MESSAGE + 1024))


def test_ctr_xor_equals_xoring_the_keystream() -> None:
    key, nonce, data = b"K" * 32, b"N" * 8, bytes(range(256)) * 3
    assert ctr_xor(key, nonce, data) == xor_bytes(data, ctr_keystream(key, nonce, len(data)))
