"""The daemon's own HTTP paths beside the ETSI API, in one place: the server's routes and
the clients both take them from here (and the clients need nothing else from the server, so
importing this module loads nothing but it and its package's empty `__init__`)."""

from __future__ import annotations

from typing import Final

STATUS_PATH: Final = "/qkdd/v1/status"
METRICS_PATH: Final = "/qkdd/v1/metrics"
SEND_PREFIX: Final = "/qkdd/v1/messages/"
INBOX_PATH: Final = "/qkdd/v1/inbox"
INBOX_PREFIX: Final = INBOX_PATH + "/"
EVENTS_PATH: Final = "/qkdd/v1/events"
