"""Edits of the demo sites' config files that several end-to-end tests make before the
daemons start (``running_demo(directory, tamper)``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qkdd.demo_sites import SITE_B


def second_sae_at_b(sae_id: str) -> Callable[[Path], None]:
    """A tamper function: site B serves a second SAE, which site A knows as remote."""

    def tamper(directory: Path) -> None:
        a = directory / "site-a.toml"
        a.write_text(
            a.read_text().replace(
                f'remote_sae_ids = ["{SITE_B.sae_id}"]',
                f'remote_sae_ids = ["{SITE_B.sae_id}", "{sae_id}"]',
            )
        )
        b = directory / "site-b.toml"
        b.write_text(
            b.read_text().replace("[[peers]]", f'[[consumers]]\nsae_id = "{sae_id}"\n\n[[peers]]')
        )

    return tamper
