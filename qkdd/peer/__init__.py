"""The peer protocol between two site daemons (sans-IO): wire format, handshake, session,
and the key-agreement messages carried inside the session. See docs/protocol.md."""
