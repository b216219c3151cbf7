"""Identifiers: safe as a single MQTT topic level and inside ACL patterns."""

from __future__ import annotations

from typing import cast

import pytest
from fedgate_common.errors import FedgateError, InvalidIdentifier
from fedgate_common.identifiers import validate_identifier
from hypothesis import given
from hypothesis import strategies as st

ACCEPTED = ["a", "Z", "0", "plant-1", "line_a.2", "9-x", "a..b", "a-", "A" * 64, "x" + "_.-" * 21]


@pytest.mark.parametrize("value", ACCEPTED)
def test_accepted(value: str) -> None:
    assert validate_identifier(value) is value


REFUSED = [
    "",
    "a" * 65,
    "a/b",
    "/a",
    "a/",
    "a+b",
    "+",
    "#",
    "a#",
    " a",
    "a ",
    "a b",
    "a\tb",
    "a\n",
    "a\x00",
    "ä",
    "aä",
    "ａ",  # fullwidth 'a'
    "٣",  # Arabic-Indic digit
    "-a",
    "_a",
    ".a",
    "..",
    "a:b",
    "a*b",
    "$SYS",
    "a$",
    "a%b",
    "a@b",
]


@pytest.mark.parametrize("value", REFUSED)
def test_refused(value: str) -> None:
    with pytest.raises(InvalidIdentifier) as info:
        validate_identifier(value, what="agent id")
    message = str(info.value)
    assert message.startswith(f"invalid agent id {value!r}")
    assert "1-64 characters" in message


def test_a_long_refused_value_is_cut_in_the_message() -> None:
    with pytest.raises(InvalidIdentifier) as info:
        validate_identifier("x/" * 10_000, what="sender")
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("value", [None, b"agent", 7])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidIdentifier):
        validate_identifier(cast(str, value))


def test_invalid_identifier_is_a_fedgate_value_error() -> None:
    assert issubclass(InvalidIdentifier, FedgateError)
    assert issubclass(InvalidIdentifier, ValueError)


@given(st.text(max_size=70))
def test_accepted_identifiers_are_safe_topic_levels(value: str) -> None:
    try:
        validate_identifier(value)
    except InvalidIdentifier:
        assert (
            not value
            or len(value) > 64
            or not value.isascii()
            or not value[0].isalnum()
            or any(not (c.isalnum() or c in "_.-") for c in value)
        )
        return
    assert 1 <= len(value) <= 64
    assert value.isascii()
    assert value[0].isalnum()
    assert not any(c in value for c in "/+#$ \t\r\n\x00")
    assert value == value.strip()


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True))
def test_every_well_formed_identifier_is_accepted(value: str) -> None:
    assert validate_identifier(value) == value
