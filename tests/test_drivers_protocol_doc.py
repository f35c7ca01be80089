"""The hex examples in drivers/PROTOCOL.md are exactly what the code sends and accepts."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from qkdd_drivers.serial.framing import FrameDecoder, SerialFrame, cobs_decode, encode_frame
from qkdd_drivers.serial.serial_constants import (
    MAX_ENCODED_FRAME_SIZE,
    MAX_FRAME_SIZE,
    MAX_PAYLOAD_SIZE,
    MIN_FRAME_SIZE,
)
from qkdd_drivers.serial.serial_messages import (
    Ack,
    KeyEntry,
    Keys,
    LinkState,
    SerialErrorCode,
    SerialErrorMessage,
    SerialHello,
    SerialMessageType,
    SerialRole,
    Status,
    decode_message,
    encode_message,
)

DOC = Path(__file__).resolve().parent.parent / "drivers" / "PROTOCOL.md"
K1 = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8").bytes
K2 = uuid.UUID("123e4567-e89b-12d3-a456-426614174000").bytes
EXAMPLES = {
    "hello-host": (0, SerialHello(SerialRole.HOST, 1, 1, 0, 0, 4096, "qkdd")),
    "hello-device": (0, SerialHello(SerialRole.DEVICE, 1, 1, 1, 128, 4096, "qkd-a")),
    "hello-announce": (0, SerialHello(SerialRole.DEVICE, 1, 1, 0, 128, 4096, "qkd-a")),
    "status": (1, Status(LinkState.UP, 0.0213, 41000, 37)),
    "keys": (
        2,
        Keys((KeyEntry(K1, bytes(range(16))), KeyEntry(K2, bytes.fromhex("ffeeddccbbaa9988")))),
    ),
    "ack": (1, Ack((K1, K2))),
    "error": (0, SerialErrorMessage(SerialErrorCode.UNEXPECTED_MESSAGE, "ACK before HELLO")),
}


def doc_examples() -> dict[str, dict[str, bytes]]:
    text = DOC.read_text()
    found: dict[str, dict[str, bytes]] = {}
    for name, block in re.findall(r"<!-- example (\S+) -->\s*```text\n(.*?)```", text, re.S):
        sections: dict[str, str] = {}
        current = None
        for line in block.splitlines():
            head = line.split(maxsplit=1)
            if head and head[0] in ("frame", "wire"):
                current = head[0]
                line = head[1] if len(head) > 1 else ""
            assert current is not None, f"example {name}: bytes before 'frame'/'wire'"
            sections[current] = sections.get(current, "") + line.replace("|", " ")
        found[name] = {k: bytes.fromhex(v) for k, v in sections.items()}
    return found


def test_every_example_is_documented() -> None:
    assert set(doc_examples()) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_documented_bytes_match_the_codec(name: str) -> None:
    seq, msg = EXAMPLES[name]
    documented = doc_examples()[name]
    msg_type, payload = encode_message(msg)
    wire = encode_frame(1, msg_type, seq, payload)
    if msg_type == SerialMessageType.HELLO:
        wire = b"\x00" + wire  # every HELLO starts with a resynchronising delimiter
    assert documented["wire"].hex(" ") == wire.hex(" ")
    assert cobs_decode(documented["wire"].strip(b"\x00")) == documented["frame"]
    (frame,) = FrameDecoder().feed(documented["wire"])
    assert isinstance(frame, SerialFrame)
    assert (frame.version, frame.msg_type, frame.seq) == (1, msg_type, seq)
    assert decode_message(frame.msg_type, frame.payload) == msg


def test_documented_constants_match_the_code() -> None:
    text = DOC.read_text()
    for name, value in [
        ("MIN_FRAME_SIZE", MIN_FRAME_SIZE),
        ("MAX_FRAME_SIZE", MAX_FRAME_SIZE),
        ("MAX_PAYLOAD_SIZE", MAX_PAYLOAD_SIZE),
        ("MAX_ENCODED_FRAME_SIZE", MAX_ENCODED_FRAME_SIZE),
    ]:
        assert re.search(rf"`{name}`\D+{value}\b", text), name
    for code in SerialErrorCode:
        assert f"| 0x{code.value:04x} | {code.name} |" in text
