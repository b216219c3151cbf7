"""A locked-down Mosquitto 2.x configuration for one cloud's broker.

What ``fedgate-coordinator broker-config`` writes (decisions 0038-0040):

- one TLS listener, no plaintext listener, ``allow_anonymous false``;
- client certificates from a cloud CA made here; the certificate's common name is the MQTT
  user name (``use_identity_as_username``). Agents get their agent id as common name;
  the other broker users have a ``:`` in theirs (``coordinator:<cloud>``,
  ``peer:<cloud>``, ``reader:<name>``), a character no agent id may contain, so no
  agent can ever hold another class's rights;
- an ACL: each agent publishes only on its own agent-stage topics and its own
  ``site/<agent>/#`` topics, and reads only the coordinator's broadcasts, its own share
  deliveries and the latest model;
- a certificate revocation list of the agents revoked in the store;
- packet and message size limits derived from the model spec (:func:`size_plan`), queue and
  memory limits, persistence on.

The pieces are pure functions on values (texts, numbers); :class:`BrokerAuthority` owns the
key files.
"""

from __future__ import annotations

import datetime
import grp
import ipaddress
import math
import os
import pwd
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedgate_common.identifiers import validate_identifier
from fedgate_common.limits import DEFAULT_LIMITS
from fedgate_common.messages import AGENT_STAGES
from fedgate_common.model_spec import ModelSpec, parameter_count, parameter_shapes
from fedgate_common.topics import cloud_prefix, federation_prefix

from fedgate_coordinator.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB
# Per-message overhead beyond the array bytes: envelope, ids, signature, certificate.
ENVELOPE_OVERHEAD = 4 * KIB
PER_ARRAY_OVERHEAD = 128  # name (at most 64 characters), dtype, shape, msgpack headers
LONGEST_ID = 64
HEADROOM = 2  # the limit is twice the largest legitimate message
CERT_DAYS = 825
CA_DAYS = 3650

CONF_NAME = "mosquitto.conf"
ACL_NAME = "fedgate.acl"
CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
CRL_NAME = "crl.pem"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"
CLIENTS_DIR = "clients"
CLIENT_CERT_NAME = "client.pem"
CLIENT_KEY_NAME = "client.key"
REVOKED_NAME = "revoked-serials.txt"


def coordinator_user(cloud: str) -> str:
    return f"coordinator:{validate_identifier(cloud, what='cloud id')}"


def peer_user(cloud: str) -> str:
    return f"peer:{validate_identifier(cloud, what='peer cloud id')}"


def reader_user(name: str) -> str:
    return f"reader:{validate_identifier(name, what='reader name')}"


class SizePlan(msgspec.Struct, frozen=True, kw_only=True):
    """The broker's size and queue limits, with the numbers they come from."""

    parameters: int
    arrays: int
    word_bits: int
    max_agents: int
    clouds: int
    model_message_bytes: int  # GlobalModel / ModelUpdate / CloudAggregate (float32)
    masked_input_bytes: int  # MaskedInput (word_bits per parameter)
    proposal_bytes: int  # a federation proposal: every cloud's aggregate
    roster_bytes: int  # KeyRoster: one signed advertisement per agent
    unmask_request_bytes: int  # UnmaskRequest: n confirmations of n ids each
    largest_message_bytes: int
    largest_message: str
    message_size_limit: int  # payload bytes; larger publishes are dropped by the broker
    max_packet_size: int  # whole packets; a larger one closes the sender's connection
    max_queued_messages: int  # per client
    max_queued_bytes: int  # per client
    memory_limit: int  # the whole broker


def size_plan(spec: ModelSpec, *, word_bits: int, max_agents: int, clouds: int) -> SizePlan:
    """Limits sized from the largest legitimate message, with :data:`HEADROOM`.

    The largest message is a float32 model (or, with many clouds, a proposal carrying
    every cloud's aggregate; with many agents, the ``UnmaskRequest`` that grows with n²).
    The limit never exceeds what receivers accept anyway (``max_message_bytes``).
    """
    if max_agents < 1 or clouds < 1:
        raise ConfigError("max_agents and clouds must be at least 1")
    if word_bits not in (16, 32):
        raise ConfigError(f"word_bits={word_bits}: use 16 or 32")
    d = parameter_count(spec)
    arrays = len(parameter_shapes(spec))
    model = 4 * d + arrays * PER_ARRAY_OVERHEAD + ENVELOPE_OVERHEAD
    masked = (word_bits // 8) * (d + 2) + PER_ARRAY_OVERHEAD + ENVELOPE_OVERHEAD
    proposal = clouds * (model + 2 * KIB) + ENVELOPE_OVERHEAD
    roster = max_agents * 400 + ENVELOPE_OVERHEAD
    unmask = max_agents * (max_agents * (LONGEST_ID + 3) + 256) + ENVELOPE_OVERHEAD
    candidates = {
        "model": model,
        "masked_input": masked,
        "proposal": proposal,
        "key_roster": roster,
        "unmask_request": unmask,
    }
    largest_name = max(candidates, key=lambda name: candidates[name])
    largest = candidates[largest_name]
    ceiling = DEFAULT_LIMITS.max_message_bytes
    message_limit = min(max(MIB, _round_up(HEADROOM * largest, 64 * KIB)), ceiling)
    packet_limit = message_limit + 64 * KIB  # topic, properties, fixed header
    # The coordinator's session must hold one whole stage of every agent while it
    # reconnects: six agent messages per round, the masked inputs the largest.
    queued_messages = max(1000, 8 * max_agents)
    queued_bytes = _round_up(max_agents * (masked + 16 * KIB) * 3 // 2, MIB)
    memory = _round_up(256 * MIB + 2 * queued_bytes + max_agents * 2 * model, 64 * MIB)
    return SizePlan(
        parameters=d,
        arrays=arrays,
        word_bits=word_bits,
        max_agents=max_agents,
        clouds=clouds,
        model_message_bytes=model,
        masked_input_bytes=masked,
        proposal_bytes=proposal,
        roster_bytes=roster,
        unmask_request_bytes=unmask,
        largest_message_bytes=largest,
        largest_message=largest_name,
        message_size_limit=message_limit,
        max_packet_size=packet_limit,
        max_queued_messages=queued_messages,
        max_queued_bytes=queued_bytes,
        memory_limit=memory,
    )


_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def host_problem(value: str) -> str | None:
    """Why ``value`` is neither an IP address nor a DNS name, or None."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if _HOST.fullmatch(value) is None:
            return f"{value!r} is neither an IP address nor a host name"
    return None


def path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written into mosquitto.conf (one token per line), or None."""
    text = str(path)
    if any(c.isspace() or not c.isprintable() or c == "#" for c in text):
        return f"{text!r}: Mosquitto reads paths without spaces, '#' or control characters"
    return None


def _round_up(value: int, step: int) -> int:
    return int(math.ceil(value / step) * step)


def acl_text(
    deployment: str, cloud: str, *, peers: Sequence[str] = (), readers: Sequence[str] = ()
) -> str:
    """The ACL file: ``pattern`` lines for agents (``%u`` = the agent id from its
    certificate), one ``user`` block each for the coordinator, peer coordinators and
    read-only site readers."""
    prefix = cloud_prefix(deployment, cloud)
    federation = federation_prefix(deployment, cloud)
    lines = [
        f"# fedgate broker ACL: deployment {deployment}, cloud {cloud}.",
        "# Written by `fedgate-coordinator broker-config`; edits are overwritten.",
        "# User name = common name of the client certificate. Agent ids never contain ':',",
        "# so the pattern lines below grant nothing useful to the ':' users.",
        "",
        "# Every agent (%u = its id): reads the coordinator's broadcasts, its own share",
        "# deliveries and the latest model...",
        f"pattern read {prefix}/round/+/+",
        f"pattern read {prefix}/round/+/deliver/%u",
        f"pattern read {prefix}/model",
        "# ...and publishes only under its own id.",
        *(f"pattern write {prefix}/round/+/{stage}/%u" for stage in sorted(AGENT_STAGES)),
        f"pattern write {prefix}/site/%u/#",
        "",
        "# This cloud's coordinator: its cloud's topics and its federation topics.",
        f"user {coordinator_user(cloud)}",
        f"topic readwrite {prefix}/#",
        f"topic readwrite {federation}/#",
    ]
    for peer in sorted(set(peers)):
        lines += [
            "",
            f"# Peer coordinator of cloud {peer}: reads this cloud's federation topics only.",
            f"user {peer_user(peer)}",
            f"topic read {federation}/#",
            f"topic deny {prefix}/#",
        ]
    for reader in sorted(set(readers)):
        lines += [
            "",
            f"# Site reader {reader}: the agents' predictions and alerts, read only.",
            f"user {reader_user(reader)}",
            f"topic read {prefix}/site/#",
            f"topic deny {prefix}/round/#",
            f"topic deny {prefix}/model",
        ]
    return "\n".join(lines) + "\n"


def mosquitto_conf(
    *,
    out_dir: Path,
    bind: str,
    port: int,
    persistence_dir: Path,
    plan: SizePlan,
    deployment: str,
    cloud: str,
    run_as: str = "mosquitto",
) -> str:
    """``mosquitto.conf``: one TLS listener with client certificates, ACL, limits."""
    problems = [p for p in (path_problem(out_dir), path_problem(persistence_dir)) if p]
    if host_problem(bind):
        problems.append(f"bind address {host_problem(bind)}")
    if not _USER.fullmatch(run_as):
        problems.append(f"broker user {run_as!r} is not a user name")
    if problems:
        raise ConfigError("; ".join(problems), problems=problems)
    return f"""\
# Mosquitto 2.x broker of fedgate deployment {deployment}, cloud {cloud}.
# Written by `fedgate-coordinator broker-config`; edits are overwritten.
# Run: mosquitto -c {out_dir / CONF_NAME}

user {run_as}
per_listener_settings false
allow_anonymous false
acl_file {out_dir / ACL_NAME}

# Persistence: retained round starts and models, and the sessions of absent clients.
persistence true
persistence_location {persistence_dir}/
autosave_interval 60

# Sizes from the model spec ({plan.parameters} parameters; the largest legitimate message
# is the {plan.largest_message}, {plan.largest_message_bytes} bytes): twice that.
message_size_limit {plan.message_size_limit}
max_packet_size {plan.max_packet_size}

# Queues per client and the broker's memory ({plan.max_agents} agents planned).
# Plant data does not go through this broker (decision 0039).
max_queued_messages {plan.max_queued_messages}
max_queued_bytes {plan.max_queued_bytes}
max_inflight_messages 20
memory_limit {plan.memory_limit}

# The only listener: TLS, every client presents a certificate of this cloud's CA.
listener {port} {bind}
protocol mqtt
cafile {out_dir / CA_CERT_NAME}
certfile {out_dir / SERVER_CERT_NAME}
keyfile {out_dir / SERVER_KEY_NAME}
crlfile {out_dir / CRL_NAME}
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
# The client id becomes the certificate's name: nobody can take over another's session.
# (A listener option: placed before the first listener it would open a default listener
# on port 1883, without TLS.)
use_username_as_clientid true
"""


# --------------------------------------------------------------------------- files


def write_private(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write atomically with ``mode`` set before any byte is written."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def share_with_group(out_dir: Path, user: str, persistence_dir: Path) -> str | None:
    """Give ``user``'s group read access to what the broker reads and ``user`` the
    persistence directory (run as root); returns the group name, or None when ``user``
    does not exist or we may not change owners."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    try:
        for path in (out_dir, out_dir / SERVER_KEY_NAME):
            os.chown(path, -1, entry.pw_gid)
        os.chown(persistence_dir, entry.pw_uid, entry.pw_gid)
    except PermissionError:
        return None
    return grp.getgrgid(entry.pw_gid).gr_name


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class IssuedClient(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    directory: str
    serial: int
    issued: bool  # False: an existing certificate was kept


class BrokerAuthority:
    """The cloud's broker CA in ``directory``: created once, kept unless rotated."""

    def __init__(self, directory: Path, *, deployment: str, cloud: str) -> None:
        self.directory = directory
        self.deployment = deployment
        self.cloud = cloud
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._cert: x509.Certificate | None = None

    @property
    def ca_cert_path(self) -> Path:
        return self.directory / CA_CERT_NAME

    @property
    def ca_key_path(self) -> Path:
        return self.directory / CA_KEY_NAME

    def exists(self) -> bool:
        return self.ca_cert_path.exists() and self.ca_key_path.exists()

    def load_or_create(self, *, rotate: bool = False) -> bool:
        """Load the CA, or create it (also when ``rotate``); True if created.

        Half a CA (the certificate without its key, or the key alone), or no CA in a
        directory that a CA has issued for (a server certificate, a CRL), is refused with a
        :class:`ConfigError` unless ``rotate``: a new CA would lock out every client, and
        that must be asked for, not happen because a restore missed a file.
        """
        if not rotate and not self.exists():
            present = [p.name for p in (self.ca_cert_path, self.ca_key_path) if p.exists()]
            issued = [
                name
                for name in (SERVER_CERT_NAME, CRL_NAME, REVOKED_NAME)
                if (self.directory / name).exists()
            ]
            if present or issued:
                missing = [n for n in (CA_CERT_NAME, CA_KEY_NAME) if n not in present]
                raise ConfigError(
                    f"cannot read the broker CA in {self.directory}: {' and '.join(missing)} "
                    f"missing beside {', '.join(present + issued)}; restore it from the backup "
                    "or pass --rotate (a new CA: every client needs new certificates)"
                )
        if self.exists() and not rotate:
            try:
                key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
                cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"cannot read the broker CA in {self.directory}: {exc}; "
                    "restore it from the backup or pass --rotate"
                ) from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"{self.ca_key_path}: not an EC private key")
            self._key, self._cert = key, cert
            return False
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fedgate {self.deployment}"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"fedgate broker CA {self.cloud}"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        write_private(self.ca_key_path, _key_pem(key))
        write_private(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        self._key, self._cert = key, cert
        return True

    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if self._key is None or self._cert is None:
            raise ConfigError("the broker CA is not loaded")
        return self._key, self._cert

    def _issue(
        self,
        common_name: str,
        *,
        usage: x509.ObjectIdentifier,
        names: Sequence[x509.GeneralName] = (),
        public_key: CertificatePublicKeyTypes | None = None,
    ) -> tuple[bytes, bytes | None, int]:
        """A certificate for ``common_name``; for a new key (returned PEM) unless
        ``public_key`` is given (from a request: the key stays with its owner)."""
        ca_key, ca_cert = self._ca()
        key = None
        if public_key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public_key = key.public_key()
        now = _now()
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(list(names)), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        key_pem = _key_pem(key) if key is not None else None
        return cert.public_bytes(serialization.Encoding.PEM), key_pem, serial

    def issue_server(self, out_dir: Path, hosts: Iterable[str], *, rotate: bool) -> bool:
        """The broker's certificate, valid for ``hosts`` (DNS names or IP addresses)."""
        cert_path, key_path = out_dir / SERVER_CERT_NAME, out_dir / SERVER_KEY_NAME
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        kept = cert_path.exists() and key_path.exists() and not rotate
        if kept and set(names) == _server_names(cert_path):
            return False  # a new --host gets a new certificate; otherwise keep it
        first = next(iter(dict.fromkeys(hosts)), "localhost")
        cert, key, _ = self._issue(
            f"fedgate broker {first}", usage=ExtendedKeyUsageOID.SERVER_AUTH, names=names
        )
        assert key is not None
        write_private(key_path, key, mode=0o640)  # group: the broker's (chgrp mosquitto)
        write_private(cert_path, cert, mode=0o644)
        return True

    def issue_client(self, out_dir: Path, user: str, *, rotate: bool) -> IssuedClient:
        """A client certificate with common name ``user`` in ``out_dir/clients/<user>/``
        (``client.pem``, ``client.key`` mode 0600, ``ca.pem``); kept if it exists (also one
        issued for a request, whose key is not here)."""
        directory = out_dir / CLIENTS_DIR / user.replace(":", "-")
        cert_path = directory / CLIENT_CERT_NAME
        if cert_path.exists() and not rotate:
            serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
            return IssuedClient(user=user, directory=str(directory), serial=serial, issued=False)
        cert, key, serial = self._issue(user, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        assert key is not None
        self._write_client(directory, cert, key)
        return IssuedClient(user=user, directory=str(directory), serial=serial, issued=True)

    def issue_client_for_key(
        self, out_dir: Path, user: str, public_key: CertificatePublicKeyTypes
    ) -> tuple[IssuedClient, int | None]:
        """A client certificate for ``public_key``, taken from a certificate request made on
        the gateway (:func:`verified_request_key`): the private key never leaves it. Kept
        when the existing certificate is for the same key; otherwise issued, and the serial
        of the certificate it replaces returned (to be revoked)."""
        directory = out_dir / CLIENTS_DIR / user.replace(":", "-")
        cert_path = directory / CLIENT_CERT_NAME
        replaced: int | None = None
        if cert_path.exists():
            existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if existing.public_key() == public_key:
                serial = existing.serial_number
                kept = IssuedClient(
                    user=user, directory=str(directory), serial=serial, issued=False
                )
                return kept, None
            replaced = existing.serial_number
        cert, _, serial = self._issue(
            user, usage=ExtendedKeyUsageOID.CLIENT_AUTH, public_key=public_key
        )
        self._write_client(directory, cert, None)
        issued = IssuedClient(user=user, directory=str(directory), serial=serial, issued=True)
        return issued, replaced

    def _write_client(self, directory: Path, cert: bytes, key: bytes | None) -> None:
        key_path = directory / CLIENT_KEY_NAME
        if key is None:
            key_path.unlink(missing_ok=True)  # a key made here earlier no longer matches
        else:
            write_private(key_path, key)
        write_private(directory / CLIENT_CERT_NAME, cert, mode=0o644)
        _, ca_cert = self._ca()
        write_private(
            directory / CA_CERT_NAME, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644
        )

    def write_revocations(self, out_dir: Path, serials: set[int]) -> None:
        """``revoked-serials.txt`` and the CRL in ``out_dir``: exactly ``serials``."""
        listing = "".join(f"{s:x}\n" for s in sorted(serials))
        write_private(out_dir / REVOKED_NAME, listing.encode())
        self.write_crl(out_dir / CRL_NAME, serials)

    def write_crl(self, path: Path, serials: Iterable[int]) -> int:
        """A CRL revoking ``serials`` (possibly none: Mosquitto needs the file)."""
        ca_key, ca_cert = self._ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=CERT_DAYS))
        )
        count = 0
        for serial in sorted(set(serials)):
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - datetime.timedelta(minutes=5))
                .build()
            )
            builder = builder.add_revoked_certificate(revoked)
            count += 1
        crl = builder.sign(ca_key, hashes.SHA256())
        write_private(path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return count


def read_revoked(out_dir: Path) -> set[int]:
    """The serials ``revoked-serials.txt`` in ``out_dir`` lists (none before the first CRL).

    Raises :class:`ConfigError` when the list is missing or unreadable while a CRL exists:
    writing the CRL again from an empty list would let revoked certificates back in.
    """
    path = out_dir / REVOKED_NAME
    if not path.exists():
        if (out_dir / CRL_NAME).exists():
            raise ConfigError(
                f"{path} is missing but {out_dir / CRL_NAME} exists: the revoked serials "
                "would be forgotten; restore the file from the backup or pass --rotate"
            )
        return set()
    try:
        return {int(line, 16) for line in path.read_text().split() if line}
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read {path}: {exc}; restore it from the backup or pass --rotate"
        ) from None


def verified_request_key(request_pem: bytes, user: str) -> CertificatePublicKeyTypes:
    """The public key of a PEM certificate request for ``user``: its signature must hold
    (the requester has the private key), its common name must be ``user``, and the key
    must be EC P-256/P-384 or RSA of at least 2048 bits. ConfigError otherwise."""
    try:
        request = x509.load_pem_x509_csr(request_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate request: {exc}") from None
    if not request.is_signature_valid:
        raise ConfigError("the certificate request's signature does not verify")
    names = [a.value for a in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [user]:
        raise ConfigError(f"the certificate request is for {names!r}, not [{user!r}]")
    key = request.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise ConfigError(f"the request's EC key uses {key.curve.name}: use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ConfigError(f"the request's RSA key has {key.key_size} bits: at least 2048")
    else:
        raise ConfigError(f"the request's key is {type(key).__name__}: use EC P-256")
    return key


def _server_names(path: Path) -> set[x509.GeneralName]:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    return set(names)


def client_serial(out_dir: Path, user: str) -> int | None:
    """Serial of the certificate issued to ``user`` in ``out_dir``, if there is one."""
    path = out_dir / CLIENTS_DIR / user.replace(":", "-") / CLIENT_CERT_NAME
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    except (OSError, ValueError):
        return None
