"""The TLS client context of every fedgate MQTT connection (agent, bridge, coordinator).

One policy for all three: TLS 1.2 or later, the broker's certificate checked against the
configured CA and its host name, and an optional client certificate whose key is named
alongside it. The files are loaded when the context is built, so a CA that is not a
certificate or a key that does not match is a configuration error at start-up, not a
connection that fails and is retried for ever.
"""

from __future__ import annotations

import ssl

from fedgate_common.errors import BrokerTlsInvalid

__all__ = ["client_tls_context"]


def client_tls_context(
    *, ca_file: str, cert_file: str = "", key_file: str = "", what: str
) -> ssl.SSLContext:
    """A client context that verifies the broker against ``ca_file`` and its host name,
    presenting ``cert_file`` with ``key_file`` when both are set ("" means not set).

    ``what`` names the login in messages ("broker", "federation.peers.cloud-2", …).
    Raises :class:`BrokerTlsInvalid` when only one of ``cert_file`` and ``key_file`` is
    set, or when a file does not load.
    """
    if bool(cert_file) != bool(key_file):
        raise BrokerTlsInvalid(
            f"{what}: set both tls_cert_file and tls_key_file for a client certificate, or neither"
        )
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerTlsInvalid(f"{what}: cannot load the CA file {ca_file}: {exc}") from None
    if cert_file:
        try:
            context.load_cert_chain(certfile=cert_file, keyfile=key_file)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerTlsInvalid(
                f"{what}: cannot load the client certificate {cert_file} with key {key_file}: {exc}"
            ) from None
    return context
