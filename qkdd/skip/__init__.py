"""SKIP, the Secure Key Integration Protocol (IETF draft-cisco-skip): qkdd as the external
key provider of routers and switches (MACsec, IPsec PPKs), backed by its hybrid keys.

`provider` answers SKIP requests without I/O, `skip_config` reads the ``[skip]`` section of
the site config, and `listener` serves SKIP over TLS 1.3 with client certificates (Trio).
Nothing is imported here, so that loading the config pays for neither. docs/skip.md says
which parts of the draft are implemented.
"""
