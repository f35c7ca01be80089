"""A QKD network of real daemons: sites joined by emulated QKD links (``qkdd.demo_network``:
one emulator process per link, every site daemon a subprocess), two end sites with no link
of their own getting keys relayed through the others.

- a line of three whose relay is compromised: it records every piece of QKD material it
  relays; the test reads all it holds and shows it has the relayed QKD half of the end
  sites' keys but not one of their keys;
- a ring of four that loses the relay on its path to SIGKILL during transfers: the other
  way takes over, no key is ready at one end only, and the killed relay comes back;
- a man in the middle on one hop and a relay that alters material: nothing altered is
  accepted end to end.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from mitm_proxy import A_TO_B, Action, MitmProxy, Tamper, Target
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient, ClientError
from qkdd.demo_network import (
    NetworkPlan,
    RunningNetwork,
    exchange_relayed_keys,
    running_network,
    sae_id,
    site_id,
    wait_for_relayed_keys,
)
from qkdd.hybrid import relayed_key_ids
from qkdd.keystore import KeyStore
from qkdd.link_params import relay_sae

COMPROMISED_RELAY = Path(__file__).resolve().parent / "compromised_relay.py"
# Generous: several handshakes and relayed transfers before the first keys, on a loaded
# machine with a daemon and an emulator per site.
FIRST_KEYS = 180
SECRET_MESSAGE = b"meet at the north gate at six"


def _network(network: RunningNetwork, index: int) -> dict[str, Any]:
    """The site's view of the network ({} while its daemon is not answering)."""
    try:
        return dict(network.status(index).get("network", {}))
    except ClientError:
        return {}


def _logs(network: RunningNetwork) -> str:
    return "\n".join(
        f"--- {name}\n" + site.log_file.read_text(errors="replace")[-3000:]
        for name, site in network.sites.items()
    )


def _drain(network: RunningNetwork, first: int, last: int, at_least: int) -> list[Any]:
    """enc_keys at ``first`` for ``last``'s SAE until at least ``at_least`` keys came."""
    taken: list[Any] = []

    def more() -> bool:
        try:
            with BlockingKeyClient(str(network.sites[site_id(first)].socket_path)) as app:
                ready = int(app.status(sae_id(last))["stored_key_count"])
                if ready:
                    taken.extend(app.enc_keys(sae_id(last), number=min(ready, 64)))
        except ClientError:
            pass  # between sessions: ask again
        return len(taken) >= at_least

    wait_until(
        more,
        f"{at_least} keys for {sae_id(last)} at {site_id(first)}",
        FIRST_KEYS,
        lambda: _logs(network),
    )
    return taken


def _all_found_at(network: RunningNetwork, last: int, first: int, keys: list[Any]) -> None:
    """Every key taken at ``first`` is (or becomes) ready at ``last``, with equal material."""
    wanted = {key.key_id: key.material for key in keys}
    found: dict[str, bytes] = {}

    def complete() -> bool:
        missing = [key_id for key_id in wanted if key_id not in found]
        with BlockingKeyClient(str(network.sites[site_id(last)].socket_path)) as app:
            for start in range(0, len(missing), 64):
                try:
                    for key in app.dec_keys(sae_id(first), missing[start : start + 64]):
                        found[key.key_id] = key.material
                except ClientError:
                    pass  # some not ready there yet: their batch is being settled
        return len(found) == len(wanted)

    wait_until(complete, "every key ready at the other end too", 60, lambda: _logs(network))
    assert found == wanted


def test_a_compromised_relay_holds_the_qkd_half_but_no_final_key(tmp_path: Path) -> None:
    record = tmp_path / "relay-record.jsonl"
    relay = (sys.executable, str(COMPROMISED_RELAY), "--record", str(record))
    plan = NetworkPlan(3)
    with running_network(tmp_path, plan, programs={site_id(2): relay}) as network:
        wait_for_relayed_keys(network, 16, timeout(FIRST_KEYS))
        rows = exchange_relayed_keys(network, 16)
        assert all(row["match"] for row in rows), rows
        with BlockingKeyClient(str(network.sites[site_id(1)].socket_path)) as app:
            final = [k.material for k in app.enc_keys(sae_id(3), number=16)]
            # A message to the far site's SAE goes through the relay too.
            app.send_message(sae_id(3), SECRET_MESSAGE)
        with BlockingKeyClient(str(network.sites[site_id(3)].socket_path)) as app:
            message = app.receive_message(wait=timeout(30))
        assert message is not None and message.body == SECRET_MESSAGE
        assert (message.sender_sae_id, message.sender_site_id) == (sae_id(1), site_id(1))
        views = {i: _network(network, i) for i in (1, 2, 3)}
        # A relay has no key with the end sites' SAEs to hand out at all.
        relay_socket = str(network.sites[site_id(2)].socket_path)
        with BlockingKeyClient(relay_socket) as app, pytest.raises(ClientError):
            app.enc_keys(sae_id(3), number=1)
    assert views[1]["transfers_confirmed"] >= 1
    assert views[2]["transfers_relayed"] >= 1
    assert views[3]["transfers_delivered"] >= 1
    assert views[1]["routes"][site_id(3)] == [site_id(1), site_id(2), site_id(3)]
    # The relay keeps relay pads on both its links, both ways.
    pads = views[2]["relay_pad_bytes"]
    assert set(pads) == {site_id(1), site_id(3)}
    assert all(way["sending"] > 0 or way["receiving"] > 0 for way in pads.values()), pads

    # Everything the relay saw of the relayed material, as its owner would keep it.
    relayed: dict[str, bytes] = {}
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        material = bytes.fromhex(entry["material"])
        size = entry["key_bits"] // 8
        count = len(material) // size
        ids = relayed_key_ids(bytes.fromhex(entry["transfer_id"]), entry["path"], count)
        relayed.update((ids[i], material[i * size : (i + 1) * size]) for i in range(count))
    assert relayed, "the relay relayed nothing"

    # It holds the QKD half: the relayed keys the destination still buffers (not yet
    # consumed by a batch) are exactly what the relay computed, IDs and material.
    kek = (tmp_path / site_id(3) / "kek.bin").read_bytes()
    destination = KeyStore(tmp_path / site_id(3) / "state" / "keys.sqlite3", kek)
    try:
        buffered = destination.get_qkd_keys(site_id(1), list(relayed))
    finally:
        destination.close()
    assert buffered, "the destination holds none of the relayed keys the relay recorded"
    assert all(relayed[key_id] == material for key_id, material in buffered.items())

    # And everything else it holds: its store (opened with its own key-encryption key),
    # its log, its record, and its relay pads.
    kek = (tmp_path / site_id(2) / "kek.bin").read_bytes()
    store = KeyStore(tmp_path / site_id(2) / "state" / "keys.sqlite3", kek)
    held: set[bytes] = set(relayed.values())
    try:
        for peer in (site_id(1), site_id(3)):
            held |= {key.material for key in store.oldest_qkd_keys(peer)}
            for sender, recipient in ((site_id(2), peer), (peer, site_id(2))):
                pair = (relay_sae(sender), relay_sae(recipient))
                count = store.pad_ready_count(*pair)
                held |= {pad.material for pad in store.take_pads(*pair, count * 1024)}
    finally:
        store.close()
    raw = b"".join(
        path.read_bytes()
        for path in [*(tmp_path / site_id(2) / "state").iterdir(), record, tmp_path / "site-2.log"]
        if path.is_file()
    )
    assert SECRET_MESSAGE not in raw  # nor does it hold the message
    for key in final:
        assert key not in held
        assert not any(key in piece for piece in held)  # nor inside a longer pad
        assert key not in raw and key.hex().encode() not in raw


def test_a_ring_survives_its_relay_killed_during_transfers(tmp_path: Path) -> None:
    plan = NetworkPlan(4, "ring")  # ends site-1 and site-3, relays site-2 and site-4
    with running_network(tmp_path, plan) as network:
        before = _drain(network, 1, 3, 16)
        path = _network(network, 1)["routes"][site_id(3)]
        relay = int(path[1].split("-")[1])
        other = 4 if relay == 2 else 2
        network.sites[site_id(relay)].process.send_signal(signal.SIGKILL)
        network.sites[site_id(relay)].process.wait(timeout(30))

        def rerouted() -> bool:
            route = _network(network, 1).get("routes", {}).get(site_id(3))
            return route == [site_id(1), site_id(other), site_id(3)]

        wait_until(
            rerouted, f"site-1's route to site-3 via site-{other}", 60, lambda: _logs(network)
        )
        relayed_before = _network(network, other)["transfers_relayed"]
        after: list[Any] = []

        def relayed_the_other_way() -> bool:
            # Keys taken use up relayed QKD material buffered before the kill; the
            # source refills the buffer over the new path.
            after.extend(_drain(network, 1, 3, 16))
            return int(_network(network, other).get("transfers_relayed", 0)) > relayed_before

        wait_until(
            relayed_the_other_way,
            f"a transfer relayed by site-{other} while keys are taken",
            FIRST_KEYS,
            lambda: _logs(network),
        )
        # No key is ready at one end only: every key handed out at site-1, before and
        # after the kill, is ready at site-3 with the same material.
        _all_found_at(network, 3, 1, before + after)

        # The end-to-end session came back over the other path with a PSK of its own
        # chain (the ML-DSA bootstrap was its first session only).
        source_log = network.sites[site_id(1)].log_file.read_text()
        assert "event=session_established peer=site-3" in source_log
        assert any(
            "event=session_established peer=site-3" in line and "auth=psk:" in line
            for line in source_log.splitlines()
        ), source_log[-3000:]

        network.sites[site_id(relay)].spawn()  # the killed relay comes back
        wait_until(
            lambda: set(_network(network, relay).get("links_up", [])) == {site_id(1), site_id(3)},
            f"site-{relay}'s links up again",
            60,
            lambda: _logs(network),
        )


def test_tampering_on_a_hop_or_by_a_relay_is_never_accepted(tmp_path: Path) -> None:
    record = tmp_path / "relay-record.jsonl"
    relay = (sys.executable, str(COMPROMISED_RELAY), "--record", str(record), "--alter", "2")
    proxy = MitmProxy()

    def through_proxy(directory: Path) -> None:
        """site-1 reaches site-2 through the proxy; site-2's dials of site-1 go nowhere."""
        text2 = (directory / "site-2.toml").read_text()
        port2 = text2.split('listen = "127.0.0.1:')[1].split('"')[0]
        proxy.start(("127.0.0.1", int(port2)))
        host, port = proxy.address
        text1 = (directory / "site-1.toml").read_text()
        (directory / "site-1.toml").write_text(
            text1.replace(f'address = "127.0.0.1:{port2}"', f'address = "{host}:{port}"')
        )
        port1 = text1.split('listen = "127.0.0.1:')[1].split('"')[0]
        (directory / "site-2.toml").write_text(
            text2.replace(f'address = "127.0.0.1:{port1}"', 'address = "127.0.0.1:9"')
        )

    # The first two sessions through the proxy each get one large frame (relayed material
    # or a routed stream's bytes) flipped; later ones pass.
    big = Target(A_TO_B, min_body=4096)
    records = proxy.plan(Tamper(Action.FLIP_BODY, big), Tamper(Action.FLIP_BODY, big))
    try:
        plan = NetworkPlan(3)
        with running_network(
            tmp_path, plan, tamper=through_proxy, programs={site_id(2): relay}
        ) as network:
            wait_for_relayed_keys(network, 16, timeout(FIRST_KEYS))
            rows = exchange_relayed_keys(network, 16)
            assert all(row["match"] for row in rows), rows
            keys = _drain(network, 1, 3, 64)
            _all_found_at(network, 3, 1, keys)
            wait_until(
                lambda: all(r.fired for r in records),
                "both tampers fired",
                60,
                lambda: _logs(network),
            )
            source_log = network.sites[site_id(1)].log_file.read_text()
    finally:
        proxy.close()
    # The hop's session refused each flipped frame (and was dialled again) ...
    assert all(r.closed_by is not None for r in records)
    # ... and the two transfers the relay altered were refused end to end by the source.
    assert source_log.count("event=relay_material_mismatch") == 2, source_log[-4000:]
