"""A tunnel's key kept fresh from hybrid keys, whatever the tunnel: what WireGuard PSKs
(``qkdd.wireguard``) and IPsec PPKs (``qkdd.ipsec``) share.

- ``tunnel_binding``: the settings every binding has (names, SAE pair, peer site, timers),
  their checks and config table, the key derivation, and the error root. No Trio, no I/O.
- ``policy``: when to rotate and when to fail closed, sans-IO (:class:`RotationPolicy`).
- ``key_rotator``: the Trio loop that carries the policy out (:class:`KeyRotator`); a tunnel
  kind supplies how its key is derived, installed, taken up and torn down, and its words.
- ``tunnel_wiring``: rotators wired to the key store and the peer links, and the install
  call that carries each rotation to the peer site.

Importing the package loads nothing else: the config loader uses ``tunnel_binding`` alone.
"""
