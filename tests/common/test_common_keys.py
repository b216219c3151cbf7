"""Text forms of Ed25519 keys: round trips and helpful errors."""

from __future__ import annotations

from collections.abc import Callable

import nacl.bindings
import nacl.signing
import pytest
from fedgate_common.errors import FedgateError
from fedgate_common.keys import (
    InvalidKey,
    parse_public_key,
    parse_signing_key,
    public_key_text,
    signing_key_text,
)
from hypothesis import given
from hypothesis import strategies as st

SIGNING = nacl.signing.SigningKey(bytes(range(32)))
VERIFY = SIGNING.verify_key


def test_public_key_text_form() -> None:
    text = public_key_text(VERIFY)
    assert text == "ed25519:" + bytes(VERIFY).hex()
    assert len(text) == len("ed25519:") + 64
    assert text == text.lower()


def test_signing_key_text_form() -> None:
    assert signing_key_text(SIGNING) == "ed25519:" + bytes(range(32)).hex()


@given(st.binary(min_size=32, max_size=32))
def test_round_trips(seed: bytes) -> None:
    signing = nacl.signing.SigningKey(seed)
    parsed = parse_signing_key(signing_key_text(signing))
    assert bytes(parsed) == seed
    assert parsed.verify_key == signing.verify_key
    assert parse_public_key(public_key_text(signing.verify_key)) == signing.verify_key


def _without_prefix(text: str) -> str:
    return text.removeprefix("ed25519:")


@pytest.mark.parametrize(
    "variant",
    [
        str,
        _without_prefix,  # the prefix is optional
        lambda t: f"  {t}\n",  # as read from a file
        lambda t: "ed25519:" + _without_prefix(t).upper(),
    ],
    ids=["canonical", "no-prefix", "whitespace", "upper-case"],
)
def test_accepted_spellings(variant: Callable[[str], str]) -> None:
    assert parse_public_key(variant(public_key_text(VERIFY))) == VERIFY
    assert bytes(parse_signing_key(variant(signing_key_text(SIGNING)))) == bytes(SIGNING)


def test_parsed_keys_sign_and_verify() -> None:
    signing = parse_signing_key(signing_key_text(SIGNING))
    verify = parse_public_key(public_key_text(VERIFY))
    assert verify.verify(signing.sign(b"hello")) == b"hello"


BAD_HEX = [
    "ed25519:" + "zz" * 32,
    "ed25519:" + "0" * 63,  # odd number of digits
    "ed25519:0x" + "00" * 31,
    "ed25519-" + "00" * 32,  # wrong prefix is not hex
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI",
]


@pytest.mark.parametrize("text", BAD_HEX)
def test_public_key_that_is_not_hex(text: str) -> None:
    with pytest.raises(InvalidKey, match="64 hex digits") as info:
        parse_public_key(text)
    assert repr(text) in str(info.value)  # says which input was wrong


@pytest.mark.parametrize("text", BAD_HEX)
def test_signing_key_that_is_not_hex_is_not_echoed(text: str) -> None:
    with pytest.raises(InvalidKey, match="64 hex digits") as info:
        parse_signing_key(text)
    assert text.removeprefix("ed25519:") not in str(info.value)  # never print secrets


@pytest.mark.parametrize(
    ("size", "text"), [(0, ""), (0, "ed25519:"), (31, "ab" * 31), (33, "ab" * 33), (64, "ab" * 64)]
)
def test_wrong_length(size: int, text: str) -> None:
    with pytest.raises(InvalidKey, match=rf"has {size} bytes; Ed25519 public keys have 32"):
        parse_public_key(text)
    with pytest.raises(InvalidKey, match=rf"has {size} bytes; expected a 32-byte seed") as info:
        parse_signing_key(text)
    raw = text.removeprefix("ed25519:")
    assert not raw or raw not in str(info.value)


#: Encodings of points of order 1, 2, 4 and 8 (from libsodium's blocklist) and a
#: non-canonical one (y = p + 1). No signing key has one of these as its public key.
SMALL_ORDER_KEYS = [
    "00" * 32,  # y = 0: order 4 (the all-zero encoding)
    "01" + "00" * 31,  # the identity
    "ec" + "ff" * 30 + "7f",  # y = -1: order 2
    "00" * 31 + "80",  # y = 0 with the sign bit set
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "ee" + "ff" * 30 + "7f",  # y = p + 1: the identity, not canonically encoded
]


@pytest.mark.parametrize("raw", SMALL_ORDER_KEYS)
@pytest.mark.parametrize("prefix", ["ed25519:", ""])
def test_small_order_public_keys_are_refused(raw: str, prefix: str) -> None:
    with pytest.raises(InvalidKey, match="not an Ed25519 public key") as info:
        parse_public_key(prefix + raw)
    assert "small-order point" in str(info.value)
    assert raw in str(info.value)  # says which key


def test_a_key_with_a_small_order_component_is_refused() -> None:
    """A real public key plus the point of order 2: on the curve, but not in the
    prime-order group that every signing key's public key lies in."""
    order_2 = bytes.fromhex("ec" + "ff" * 30 + "7f")
    mixed = nacl.bindings.crypto_core_ed25519_add(bytes(VERIFY), order_2)
    with pytest.raises(InvalidKey, match="not an Ed25519 public key"):
        parse_public_key(mixed.hex())


def test_invalid_key_is_a_fedgate_value_error() -> None:
    assert issubclass(InvalidKey, FedgateError)
    assert issubclass(InvalidKey, ValueError)


@given(st.text(max_size=80))
def test_arbitrary_text_raises_only_invalid_key(text: str) -> None:
    for parse in (parse_public_key, parse_signing_key):
        try:
            key = parse(text)
        except InvalidKey:
            continue
        assert len(bytes(key)) == 32
