"""The agent's Ed25519 identity key: generated on the gateway, never leaves it (mode 0600)."""

from __future__ import annotations

import os
from pathlib import Path

import nacl.signing
from fedgate_common.keys import InvalidKey, parse_signing_key, signing_key_text

from fedgate_agent.errors import ConfigError, IdentityExists

IDENTITY_FILE = "identity.key"


def identity_path(state_dir: Path) -> Path:
    return state_dir / IDENTITY_FILE


def create_identity(state_dir: Path) -> nacl.signing.SigningKey:
    """Generate and store a new identity key; refuses to replace an existing one."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    state_dir.chmod(0o750)  # may exist already, created by writing the config file
    path = identity_path(state_dir)
    key = nacl.signing.SigningKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise IdentityExists(
            f"{path} exists: this agent already has an identity "
            "(delete it only to re-enroll under a new key)"
        ) from None
    with os.fdopen(fd, "w") as handle:
        handle.write(signing_key_text(key) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return key


def load_identity(state_dir: Path) -> nacl.signing.SigningKey:
    path = identity_path(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"identity key {path} not found: run `fedgate-agent init`") from None
    except PermissionError:
        raise ConfigError(f"cannot read {path}: check its owner and mode 0600") from None
    try:
        return parse_signing_key(text)
    except InvalidKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
