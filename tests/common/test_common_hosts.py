"""Hosts in settings: refused when the configuration is read if the network stack would
refuse them only when the connection is made."""

from __future__ import annotations

import socket

import pytest
from fedgate_common.hosts import host_problem, url_host_problem

ACCEPTED = [
    "127.0.0.1",
    "::1",
    "fe80::1%eth0",
    "localhost",
    "broker.example",
    "broker.example.",  # fully qualified
    "mqtt_broker",  # a container's service name
    "bücher.example",  # IDNA: xn--bcher-kva.example
    "a" * 63 + ".example",
]


@pytest.mark.parametrize("host", ACCEPTED)
def test_ip_literals_and_host_names_are_accepted(host: str) -> None:
    assert host_problem(host) is None


UNENCODABLE = ["a..b", ".broker", "a" * 64 + ".example", "xn--ü.example", "\udcff"]


@pytest.mark.parametrize("host", UNENCODABLE)
def test_names_idna_cannot_encode_are_problems(host: str) -> None:
    problem = host_problem(host)
    assert problem is not None
    assert problem.startswith("IDNA cannot encode it: ")
    assert problem.endswith("each label between dots needs 1 to 63 characters")


@pytest.mark.parametrize("host", UNENCODABLE)
def test_they_are_the_names_the_resolver_raises_unicode_error_for(host: str) -> None:
    """What a connection to them raised, as a traceback, before they were checked (the
    name is refused while it is encoded: nothing is looked up)."""
    with pytest.raises(UnicodeError):
        socket.getaddrinfo(host, 1883)


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("", "it is empty"),
        ("mqtt://broker", "it has a scheme, a path or spaces; give the host alone"),
        ("broker/x", "it has a scheme, a path or spaces; give the host alone"),
        ("bro ker", "it has a scheme, a path or spaces; give the host alone"),
        ("broker:1883", "it has a port; set the port in its own setting"),
        ("[::1]", "it is in brackets; give an IPv6 address without them"),
        ("[fe80::1%eth0]", "it is in brackets; give an IPv6 address without them"),
        ("a\x00b", "it has control characters"),
        (
            ".".join(["a" * 63] * 4),  # 255 characters: labels fine, the name too long
            "it is longer than the 253 characters a DNS name may have",
        ),
    ],
)
def test_other_forms_that_are_not_a_host(host: str, problem: str) -> None:
    assert host_problem(host) == problem


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("opc.tcp://10.1.0.20:4840", None),
        ("opc.tcp://[::1]:4840/path", None),
        ("opc.tcp://plc.example:4840", None),
        ("opc.tcp://a..b:4840", "IDNA cannot encode it: label empty or too long"),
        ("opc.tcp://:4840", "it is empty"),
        ("opc.tcp://[::1:4840", "the URL does not parse: Invalid IPv6 URL"),
        ("opc.tcp://plc.example:99999", "the URL does not parse: Port out of range"),
        ("opc.tcp://plc.example:abc/x", "the URL does not parse: Port could not be cast"),
    ],
)
def test_the_host_of_a_url(url: str, problem: str | None) -> None:
    found = url_host_problem(url)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(problem)
