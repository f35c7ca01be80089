"""Config files written into a test's directory for tests that load configs: both demo
sites' configs with their public keys (no private keys), the production example with a
public key of site B, and binding tables to append to them."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from qkdd.config import ConfigError, load_config
from qkdd.crypto import PqcBackend
from qkdd.demo_sites import SITE_A, SITE_B, render

REPO = Path(__file__).resolve().parent.parent


def write_demo_sites(directory: Path, backend: PqcBackend) -> Path:
    """Both demo sites' configs and public keys in ``directory``; returns it."""
    for site in (SITE_A, SITE_B):
        (directory / site.directory).mkdir()
        key = backend.signing_key_from_seed(os.urandom(32))
        (directory / site.directory / "identity.pub").write_text(
            base64.b64encode(key.public_bytes).decode()
        )
        (directory / f"{site.site_id}.toml").write_text(render(site))
    return directory


def site_host_example(directory: Path, backend: PqcBackend) -> str:
    """config/site-host.example.toml, with site B's public key a file in ``directory``."""
    pub = directory / "site-b.pub"
    pub.write_text(
        base64.b64encode(backend.signing_key_from_seed(os.urandom(32)).public_bytes).decode()
    )
    text = (REPO / "config" / "site-host.example.toml").read_text()
    return text.replace("/etc/qkdd/site-b.pub", str(pub))


def toml_table(section: str, fields: dict[str, str], **changes: str | None) -> str:
    """An array-of-tables entry ``[[section]]`` holding ``fields`` (TOML values) with
    ``changes`` (None: leave that key out)."""
    merged = {**fields, **changes}
    return f"\n[[{section}]]\n" + "".join(
        f"{k} = {v}\n" for k, v in merged.items() if v is not None
    )


def config_error(path: Path, table: str) -> ConfigError:
    """The ConfigError that loading the config at ``path`` raises once ``table`` is
    appended to it."""
    path.write_text(path.read_text() + table)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value
