"""``fedgate-agent broker-key``: the gateway's own key for its cloud-broker certificate.

The key is made here (EC P-256, mode 0600) and never leaves the gateway. The command
prints a certificate request for it, with the agent id as common name; the coordinator's
operator signs it with ``fedgate-coordinator enroll ... --broker-out DIR --broker-csr FILE``
and sends back ``client.pem`` and ``ca.pem``, which are public.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fedgate_common.atomic_files import atomic_write

from fedgate_agent.cli_support import EXIT_CODES_HELP, config_option, echo_json, guard
from fedgate_agent.config import load_config
from fedgate_agent.errors import ConfigError

__all__ = ["broker_key_command", "certificate_request", "load_or_make_key"]

DEFAULT_KEY_NAME: Final = "broker-client.key"


def load_or_make_key(path: Path, *, new: bool) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The EC private key in ``path``, or a new P-256 key written there (0600) when there
    is none or ``new``; True when made now."""
    if path.exists() and not new:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"cannot read the broker key {path}: {exc}; pass --new-key to replace it"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{path} is not an EC private key; pass --new-key to replace it")
        return key, False
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        atomic_write(path, pem, mode=0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write the broker key {path}: {exc}") from None
    return key, True


def certificate_request(key: ec.EllipticCurvePrivateKey, agent_id: str) -> bytes:
    """A PEM certificate request for ``key`` with common name ``agent_id``."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


@click.command("broker-key", epilog=EXIT_CODES_HELP)
@config_option
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The private key file (default: broker.tls_key_file, else "
    f"<state_dir>/{DEFAULT_KEY_NAME}). Kept if it exists.",
)
@click.option(
    "--csr-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the certificate request to this file instead of standard output.",
)
@click.option("--new-key", is_flag=True, help="Replace an existing key (key rotation).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@guard
def broker_key_command(
    config_path: Path, key_path: Path | None, csr_out: Path | None, new_key: bool, as_json: bool
) -> None:
    """Make this gateway's broker key (once) and print a certificate request for it.

    The private key stays on the gateway. Send the request to the coordinator's operator,
    who signs it (`fedgate-coordinator enroll AGENT KEY --broker-out DIR --broker-csr FILE`)
    and sends back client.pem and ca.pem; then set broker.tls_cert_file, tls_key_file and
    tls_ca_file. Running it again prints a request for the same key; --new-key rotates.

    \b
    Examples:
      sudo -u fedgate-agent fedgate-agent broker-key --csr-out /tmp/site-1.csr
      fedgate-agent broker-key --new-key --json
    """
    config = load_config(config_path, require_complete=False)
    path = key_path or Path(config.broker.tls_key_file or Path(config.state_dir) / DEFAULT_KEY_NAME)
    key, made = load_or_make_key(path, new=new_key)
    request = certificate_request(key, config.agent_id)
    if csr_out is not None:
        try:
            atomic_write(csr_out, request, mode=0o644)
        except OSError as exc:
            raise ConfigError(f"cannot write the certificate request {csr_out}: {exc}") from None
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if as_json:
        echo_json(
            {
                "agent_id": config.agent_id,
                "key_file": str(path),
                "key_created": made,
                "public_key_sha256": hashlib.sha256(public).hexdigest(),
                "csr_file": str(csr_out) if csr_out is not None else None,
                "csr": request.decode(),
            }
        )
        return
    state = "made" if made else "kept"
    click.echo(f"broker key {state}: {path} (stays on this gateway)", err=True)
    if csr_out is None:
        click.echo(request.decode(), nl=False)
    else:
        click.echo(f"certificate request for {config.agent_id!r}: {csr_out}", err=True)
