"""A relay site run as an attacker who owns it would run it: the real daemon, plus a record
of every piece of relayed QKD material it opens, appended as JSON lines to the file given
with ``--record`` (transfer ID, path, key size, material, all hex). With ``--alter N`` it
also flips one bit of the material of the first N transfers it opens before relaying them
on (re-sealed under the next hop's keys like any other: each hop's MAC holds).

    python tests/compromised_relay.py --record FILE [--alter N] run --config SITE.toml

It patches ``open_hop`` where ``qkdd.relay.relay_state`` calls it, then runs ``qkdd``'s
own command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from qkdd.cli import main
from qkdd.relay import relay_state
from qkdd.relay.hop_seal import HopKeys, OpenedHop, RelayKeysFrame


def instrument(record: str, alter: int) -> None:
    original = relay_state.open_hop
    altered = 0

    def open_hop(frame: RelayKeysFrame, keys: HopKeys, *, sender: str, receiver: str) -> OpenedHop:
        nonlocal altered
        opened = original(frame, keys, sender=sender, receiver=receiver)
        header = frame.header
        with open(record, "a") as out:
            entry = {
                "transfer_id": header.transfer_id.hex(),
                "path": list(header.path),
                "key_bits": header.key_bits,
                "material": opened.material.hex(),
            }
            out.write(json.dumps(entry) + "\n")
        if altered < alter and receiver != header.path[-1]:
            altered += 1
            flipped = bytes([opened.material[0] ^ 1]) + opened.material[1:]
            opened = dataclasses.replace(opened, material=flipped)
        return opened

    relay_state.open_hop = open_hop  # type: ignore[assignment]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True)
    parser.add_argument("--alter", type=int, default=0)
    ours, rest = parser.parse_known_args()
    instrument(ours.record, ours.alter)
    sys.exit(main(rest))
