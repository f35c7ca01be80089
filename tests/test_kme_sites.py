"""Two sites whose QKD devices are ETSI GS QKD 014 KMEs (as commercial systems are): the
link master pulls keys from its KME, the slave fetches by ID what the master names, and
the applications still get identical hybrid keys. The KME pair is qkdd's own ETSI 014
server over mutual TLS with one shared in-memory pool, a real HTTPS service standing in for
the vendor's two KMEs."""

from __future__ import annotations

import subprocess
import sys

from pki import make_pki
from timeouts import timeout

from qkdd.demo import exchange_keys, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_B

KME = """
import sys
from functools import partial

import trio

from qkdd.etsi014.handler import RequestHandler
from qkdd.etsi014.memory_pool import MemoryKeyPool
from qkdd.http_server.tls import sae_ids_from_certificate, serve_tls

cert, key, ca = sys.argv[1:4]
names = {"app-a.example": "qkdd-site-a", "app-b": "qkdd-site-b"}
pool = MemoryKeyPool(names.values())
pool.fill("qkdd-site-a", "qkdd-site-b", 5000)


async def main():
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(
                serve_tls, "127.0.0.1", 0, RequestHandler(pool),
                partial(sae_ids_from_certificate, allowed=names),
                cert_file=cert, key_file=key, client_ca_file=ca,
            )
        )
        print(listeners[0].socket.getsockname()[1], flush=True)


trio.run(main)
"""


def test_sites_on_etsi014_kmes_agree_on_hybrid_keys(tmp_path):
    pki = make_pki(tmp_path)
    kme = subprocess.Popen(
        [sys.executable, "-c", KME, pki.server.cert, pki.server.key, pki.ca],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(kme.stdout.readline())

        def use_kmes(directory):
            for site, creds, own, peer in (
                ("site-a", pki.client_a, "qkdd-site-a", "qkdd-site-b"),
                ("site-b", pki.client_b, "qkdd-site-b", "qkdd-site-a"),
            ):
                path = directory / f"{site}.toml"
                text = path.read_text()
                serial = text[text.index('kind = "serial"') :]
                path.write_text(
                    text.replace(
                        serial,
                        f'kind = "etsi014"\nurl = "https://127.0.0.1:{port}"\n'
                        f'certificate = "{creds.cert}"\nprivate_key = "{creds.key}"\n'
                        f'ca = "{pki.ca}"\nown_sae_id = "{own}"\npeer_sae_id = "{peer}"\n',
                    )
                )

        with running_demo(tmp_path, tamper=use_kmes) as (site_a, site_b):
            wait_for_keys(site_a, SITE_B.sae_id, 8, timeout=timeout(30))
            rows = exchange_keys(site_a, site_b, 8)
            assert len(rows) == 8 and all(row["match"] for row in rows)
            assert "event=session_established" in site_b.log_file.read_text()
    finally:
        kme.terminate()
        kme.wait(timeout=timeout(20))
