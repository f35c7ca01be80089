"""Every error class of the daemon derives from `qkdd.errors.QkddError` (what `qkdd` prints as
one line), except the control flow `qkdd.errors` names and the light client's own tree; and
`qkdd.errors` and `qkdd.constants` import nothing of qkdd, so any module may use them."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import qkdd
from qkdd.errors import QkddError

QKDD = Path(qkdd.__file__).parent

# Control flow that never reaches an operator (listed in qkdd.errors' docstring).
CONTROL_FLOW = {
    "qkdd.http_server.exchange.Reject",
    "qkdd.http_server.exchange.MethodNotAllowed",
    "qkdd.http_server.serving._BodyTooLarge",
    "qkdd.skip.provider._Refusal",
    "qkdd.peer.calls.CallRefused",
    "qkdd.peer_sessions.PeerClosed",
    "qkdd.peering.HandshakeEvicted",
    "qkdd.store.application_keys._KeyMissing",
    # A relay frame naming pads not held here: rolls its store transaction back.
    "qkdd.relay_node._PadsMissing",
    # A routed stream that ended (a Trio stream error, as a TCP connection's would be), and
    # a dial with no path (an OSError, as a refused TCP connect would be).
    "qkdd.routed_stream.RoutedStreamClosed",
    "qkdd.routed_stream.NoRoute",
}


def daemon_exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module in pkgutil.walk_packages(qkdd.__path__, "qkdd."):
        if module.name.startswith("qkdd.client") or module.name.endswith("__main__"):
            continue
        loaded = importlib.import_module(module.name)
        for name, value in vars(loaded).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.name
            ):
                found[f"{module.name}.{name}"] = value
    return found


def test_every_daemon_error_is_under_the_root() -> None:
    classes = daemon_exception_classes()
    outside = sorted(
        name
        for name, cls in classes.items()
        if not issubclass(cls, QkddError) and name not in CONTROL_FLOW
    )
    assert outside == []
    assert set(classes) >= CONTROL_FLOW, "a control-flow class moved: update qkdd.errors"


def test_value_errors_stay_value_errors() -> None:
    from qkdd.ipsec.vici import ViciEncodeError
    from qkdd.key_ids import KeyIdError
    from qkdd.rotation.tunnel_binding import BindingValueError, KeyMaterialError

    for cls in (KeyIdError, BindingValueError, KeyMaterialError, ViciEncodeError):
        assert issubclass(cls, QkddError) and issubclass(cls, ValueError), cls


def test_the_client_keeps_its_own_root() -> None:
    from qkdd.client.client_errors import ClientError

    assert not issubclass(ClientError, QkddError)


def test_errors_and_constants_import_nothing_of_qkdd() -> None:
    for name in ("errors.py", "constants.py"):
        tree = ast.parse((QKDD / name).read_text())
        imported = [
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        ]
        assert not [m for m in imported if m and m.split(".")[0] == "qkdd"], (name, imported)
