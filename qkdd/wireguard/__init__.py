"""WireGuard pre-shared keys (PSKs) kept fresh from hybrid keys: the ``[[wireguard]]``
bindings, the ``wg`` runner, the rotation loop with a PSK, and the wiring to the store and
the peer links (``docs/wireguard.md``).

Importing the package loads nothing else: ``qkdd.config`` uses ``wireguard_binding`` and
``wireguard_config`` alone, without Trio.
"""
