"""How the agent logs in to an MQTT broker: user name, password file and TLS files.

A locked-down broker (``fedgate-coordinator broker-config``) has a TLS listener only and no
anonymous access, so both of the agent's connections — the protocol link to its cloud's
broker and the plant-data ingest — take the same four settings. Everything is read and
checked here, when the service starts, so that a missing file or a bad key is a
:class:`ConfigError` before any network IO and never a reconnect loop.

The plant-data ingest uses the ``ingest.mqtt_*`` settings; when it reads from the cloud's
broker itself (``ingest.mqtt_host = ""``) and sets none of them, it logs in as the agent does.

The password file holds the password on its first line (systemd ``LoadCredential`` puts it
under ``$CREDENTIALS_DIRECTORY``). TLS verifies the broker's certificate against
``tls_ca_file`` and its host name; ``tls_cert_file`` + ``tls_key_file`` add a client
certificate when the broker asks for one.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedgate_common.errors import BrokerTlsInvalid
from fedgate_common.mqtt_tls import client_tls_context

from fedgate_agent.config import AgentConfig, BrokerConfig
from fedgate_agent.errors import ConfigError

__all__ = [
    "BrokerLogin",
    "broker_login",
    "check_login_files",
    "cloud_login",
    "ingest_login",
    "read_password",
]


@dataclass(frozen=True)
class BrokerLogin:
    """What a connection presents: ``None`` fields are left out of CONNECT / plain TCP."""

    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None


def read_password(path: str, what: str) -> str | None:
    """The first line of ``path`` ("" → no password); :class:`ConfigError` if unreadable."""
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} password file {path}: {exc}") from None
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def broker_login(
    *,
    username: str,
    password_file: str,
    tls_ca_file: str,
    tls_cert_file: str,
    tls_key_file: str,
    what: str,
) -> BrokerLogin:
    """Read and check one connection's login settings ("" means not set)."""
    if (tls_cert_file or tls_key_file) and not tls_ca_file:
        raise ConfigError(f"{what}: a client certificate needs tls_ca_file (TLS) as well")
    context = None
    if tls_ca_file:
        try:
            context = client_tls_context(
                ca_file=tls_ca_file, cert_file=tls_cert_file, key_file=tls_key_file, what=what
            )
        except BrokerTlsInvalid as exc:
            raise ConfigError(str(exc)) from None
    return BrokerLogin(
        username=username or None,
        password=read_password(password_file, what),
        tls=context,
    )


def cloud_login(broker: BrokerConfig) -> BrokerLogin:
    """The login of the agent's protocol link to its cloud's broker (``[broker]``)."""
    return broker_login(
        username=broker.username,
        password_file=broker.password_file,
        tls_ca_file=broker.tls_ca_file,
        tls_cert_file=broker.tls_cert_file,
        tls_key_file=broker.tls_key_file,
        what="[broker]",
    )


def ingest_login(config: AgentConfig) -> BrokerLogin:
    """The login of the plant-data ingest: ``ingest.mqtt_*``, or the cloud link's (above)."""
    ingest = config.ingest
    own = (
        ingest.mqtt_username,
        ingest.mqtt_password_file,
        ingest.mqtt_tls_ca_file,
        ingest.mqtt_tls_cert_file,
        ingest.mqtt_tls_key_file,
    )
    if not ingest.mqtt_host and not any(own):
        return cloud_login(config.broker)
    return broker_login(
        username=ingest.mqtt_username,
        password_file=ingest.mqtt_password_file,
        tls_ca_file=ingest.mqtt_tls_ca_file,
        tls_cert_file=ingest.mqtt_tls_cert_file,
        tls_key_file=ingest.mqtt_tls_key_file,
        what="[ingest] mqtt_*",
    )


def check_login_files(config: AgentConfig) -> None:
    """Read every password and TLS file `run` reads: the cloud link's, the MQTT ingest's (when
    there are MQTT sources) and each OPC-UA source's, so that `config validate` fails where
    `run` would. Raises one :class:`ConfigError` listing every file that does not load."""
    checks: list[Callable[[], object]] = [functools.partial(cloud_login, config.broker)]
    if config.mqtt_source:
        checks.append(functools.partial(ingest_login, config))
    for source in config.opcua_source:
        checks.append(functools.partial(read_password, source.password_file, "OPC-UA"))
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.extend(exc.problems)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"login files that do not load:\n{listing}", problems=problems)
