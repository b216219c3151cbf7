"""The coordinator's Ed25519 signing key, kept in the state directory with mode 0600."""

from __future__ import annotations

import os
from pathlib import Path

import nacl.signing
from fedgate_common.keys import InvalidKey, parse_signing_key, signing_key_text

from fedgate_coordinator.errors import ConfigError


def create_signing_key(path: Path) -> nacl.signing.SigningKey:
    """Generate a key and write it with mode 0600; refuse to overwrite an existing key."""
    key = nacl.signing.SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to replace a signing key") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(signing_key_text(key) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return key


def load_signing_key(path: Path) -> nacl.signing.SigningKey:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"signing key {path} not found: run `fedgate-coordinator init`") from None
    except PermissionError:
        raise ConfigError(f"cannot read signing key {path}: check owner and mode 0600") from None
    try:
        return parse_signing_key(text)
    except InvalidKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
