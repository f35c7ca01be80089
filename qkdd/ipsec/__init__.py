"""IPsec post-quantum preshared keys (PPKs, RFC 8784) kept fresh from hybrid keys: the
``[[ipsec]]`` bindings, strongSwan's VICI protocol, the charon client, the rotation policy
and loop, and the wiring to the store and the peer links (``docs/ipsec.md``).

Importing the package loads nothing else: ``qkdd.config`` uses ``ipsec_binding`` and
``ipsec_config`` alone, without Trio.
"""
