"""The daemon's timers and limits in one place, each with its reason.

What is here: the values a site chooses for itself, which an operator may need to find
and weigh: timeouts, retry backoffs, periods, batch sizes of store reads, queue,
connection and cache limits. The modules that use them import them from here, under the
same names (so ``grep NAME`` finds both the value and its uses).

What is not: values both ends of a protocol must agree on, and sizes of a wire or storage
format, stay in their protocol's module, beside the code that encodes them and the text
that specifies them: the peer protocol's message sizes, batch window, heartbeat and the
silence and batch-reply deadlines derived from it (``qkdd.peer``, docs/protocol.md),
VICI's segment sizes (``qkdd.ipsec.vici``), what a SKIP or metrics request may be
(``qkdd.skip.provider``, ``qkdd.metrics_listener``), the store's chunk and frame sizes
(``qkdd.store``), the crypto sizes (``qkdd.crypto``). A value derived from one of those
stays beside its formula (``qkdd.peer_sessions.CLAIM_TIMEOUT``). The buffer size of one
read stays with the code that reads. The drivers (``qkdd_drivers``) keep their own
(``drivers/serial/serial_constants.py``, ``drivers/kme/device.py``).

Times are in seconds unless the name says otherwise. This module imports nothing, so any
module, sans-IO ones included, may import it.
"""

from __future__ import annotations

from typing import Final

# -- the daemon's own loops (qkdd.daemon, qkdd.progress, qkdd.status) -------------------------

#: How often the STATUS= line sent to systemd is refreshed: often enough for
#: `systemctl status` to look live, rarely enough to cost nothing.
STATUS_INTERVAL: Final = 5.0
#: How often expired keys are looked for and erased (at most half a key lifetime apart).
EXPIRY_INTERVAL: Final = 10.0
#: How often link and pool changes are looked for, to publish key events.
EVENT_POLL_INTERVAL: Final = 0.25
#: How long a link may want keys, have QKD keys and a session, and still make none before
#: the watchdog pings stop: longer than a batch reply deadline plus a redial, so ordinary
#: recoveries never trip it.
STALL_GRACE_SECONDS: Final = 60.0
#: Warnings and errors kept for the status report, newest last.
RECENT_ERRORS: Final = 20
#: A log message longer than this is cut in that ring: bounds memory and the status size.
MAX_MESSAGE_CHARS: Final = 500

# -- peers (qkdd.peering, qkdd.peer_listener, qkdd.peer.admission) ---------------------------

#: Both roles give up a handshake this long after it started (the initiator counts from
#: the start of its connect, the responder from accepting the connection).
HANDSHAKE_TIMEOUT: Final = 10.0
#: A responder closes a connection that has not delivered an acceptable HELLO this long
#: after it was accepted: an initiator sends HELLO at once, so only a stranger is slower.
HELLO_TIMEOUT: Final = 3.0
#: Strangers' handshakes in progress, in all and per source address (per /64 for IPv6):
#: an unauthenticated client cannot exhaust CPU or memory, or keep the peer out.
MAX_PENDING_HANDSHAKES: Final = 32
MAX_PENDING_HANDSHAKES_PER_ADDRESS: Final = 4
#: Handshake slots kept for each configured address of a peer: a peer runs one dial at a
#: time, so a few cover a restart racing its old connection.
RESERVED_HANDSHAKES_PER_PEER_ADDRESS: Final = 4
#: Dialling a peer that does not answer: the first pause, doubling up to the longest, so a
#: site that is down costs little and one that comes back is found within seconds.
DIAL_BACKOFF_FIRST: Final = 0.25
DIAL_BACKOFF_MAX: Final = 10.0
#: Each direction of a session moves to a new key at least this often (the session also
#: rekeys by volume: qkdd.peer.connection.REKEY_AFTER_FRAMES).
REKEY_SECONDS: Final = 600.0
#: Pause before asking a fetch-by-ID device (a KME) again for keys it did not have yet:
#: the two sites' KMEs may still be syncing.
FETCH_RETRY_DELAY: Final = 0.2
#: Device keys held at most before the driver stops acknowledging (back-pressure to the
#: device, which then buffers): bounds the QKD material at rest here and the disk a stalled
#: peer can make us use. The default of `qkd_buffer_keys` in config; 4096 keys of 256 bits
#: is 1 Mbit.
QKD_BUFFER_MAX: Final = 4096

# -- the key store (qkdd.durability, qkdd.store) ----------------------------------------------

#: A sync asked for in the event loop's thread runs there only while syncs take less than
#: this on average; slower ones go to a worker thread (qkdd.durability).
INLINE_SYNC_SECONDS: Final = 0.002
#: Used QKD key IDs remembered per peer at least, newest first: more than the largest
#: window of keys in flight a serial device may announce (65,535), so any key a device may
#: still re-send is recognised as used.
CONSUMED_MEMORY: Final = 65_536
#: QKD buffer frames read per statement, doubling from the first to the most: few for a
#: short read, few statements for a long one.
FRAMES_READ_FIRST: Final = 4
FRAMES_READ_MOST: Final = 256

# -- the local HTTP API (qkdd.http_server, qkdd.etsi014, qkdd.metrics_listener) ---------------

#: Request line plus headers; a legitimate ETSI request needs well under 1 KiB.
MAX_HEADER_BYTES: Final = 8 * 1024
#: Time allowed to receive one whole request, or to send one response; by default also the
#: longest a connection may sit idle (no request in progress) before it is closed.
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
#: The TLS listeners' handshake deadline: a TLS 1.3 handshake is two round trips; a client
#: needing longer is stalled or hostile.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
#: Before closing a connection whose client may still be sending, read and discard its
#: input for this long (or this much): closing a socket with unread input makes the kernel
#: report a reset to the client, which may then lose the error response it was about to read.
LINGER_SECONDS: Final = 1.0
LINGER_MAX_BYTES: Final = 1024 * 1024
#: Connections the kernel queues before they are accepted (it caps this at
#: net.core.somaxconn, 4096 by default since Linux 5.4). Applications that connect in a
#: burst, e.g. at boot, while the daemon is busy, are queued rather than told EAGAIN.
LISTEN_BACKLOG: Final = 4096
#: After accept(2) ran out of resources (descriptors, memory), wait this long before
#: accepting again (connections queue meanwhile).
ACCEPT_BACKOFF: Final = 0.1
#: A warning about a condition that persists (no descriptors, connection caps) is repeated
#: at most this often, with a count of what happened meanwhile.
PRESSURE_LOG_INTERVAL: Final = 10.0
#: Descriptors kept for the rest of the daemon, at least: the key store (database, journal,
#: WAL index), devices, peer connections and listeners, signal and event-loop plumbing,
#: logs, and headroom for short-lived files (credentials, configuration reloads) ...
FD_RESERVE_MIN: Final = 64
#: ... and at least this fraction (1/8) of the limit, for sites with many peers or TLS
#: clients.
FD_RESERVE_FRACTION: Final = 8
#: Connections beyond every cap for the operator (uid 0) and the daemon's own uid.
PRIVILEGED_RESERVE: Final = 16
#: At most this many API connections whatever the descriptor limit: each is a task and an
#: HTTP parser, and a site's applications need far fewer.
MAX_API_CONNECTIONS: Final = 4096
#: The smallest caps that still serve anyone, for absurdly low descriptor limits.
MIN_API_CONNECTIONS: Final = 4
#: Request heads parsed before, remembered by their bytes: a caller sends the same head
#: again and again (the same target, headers and body length), so most requests are read
#: from this cache.
MAX_HEADS: Final = 256
#: Request targets remembered with what they name, at most (a handler sees a few dozen).
MAX_TARGETS: Final = 1024
#: At most this many additional slave SAEs per key request (the Status max_SAE_ID_COUNT).
MAX_SAE_ID_COUNT: Final = 8
#: Prometheus keeps one connection per target; the rest is room for a second scraper and a
#: person with curl. Each connection costs a descriptor out of the daemon's own reserve
#: (FD_RESERVE_MIN), so the cap stays small.
MAX_METRICS_CONNECTIONS: Final = 8
#: Beyond that cap, for the operator (uid 0) and the daemon's uid on a Unix socket.
METRICS_PRIVILEGED_RESERVE: Final = 2

# -- key events and messages (qkdd.events, qkdd.messaging, qkdd.store_pool) -------------------

#: Events queued for one subscriber that does not read; beyond it the oldest are dropped
#: and the subscriber is told (events_lost).
QUEUE_LIMIT: Final = 1024
#: Expired or withdrawn keys are reported in events of at most this many IDs.
MAX_IDS_PER_EVENT: Final = 256
#: How long enc_keys waits for the slave's site to confirm an assignment.
ASSIGN_TIMEOUT: Final = 5.0
#: How long a send waits for the recipient's site to say "stored".
DELIVERY_TIMEOUT: Final = 10.0
#: How long the destination of a relayed transfer waits for the source to answer its
#: RELAY_CONFIRM (end to end, over the relay path); the source abandons the transfer
#: itself at qkdd.relay.relay_state.CONFIRM_TIMEOUT.
RELAY_CONFIRM_TIMEOUT: Final = 30.0
#: The largest message body a Messenger takes unless told less (the daemon passes
#: [messages] max_size, at most this much).
MAX_MESSAGE_SIZE: Final = 1024 * 1024
#: The longest an application may wait for its next message in one request.
MAX_WAIT_SECONDS: Final = 300.0
#: A received message's ID is remembered this long, so a message re-sent within it (its
#: sender never heard "stored") is not kept twice.
REMEMBER_IDS_SECONDS: Final = 7 * 24 * 3600.0

# -- link state and routes between sites (qkdd.relay.link_state) ------------------------------

#: A site sends a fresh LINK_STATE advertisement of its own at least this often, links
#: changed or not: only what has no other trigger depends on it (a copy lost with a session
#: that failed, an advertisement that must outlive LINK_STATE_LIFETIME). Link changes are
#: advertised at once. OSPF's LSRefreshTime is 30 min; a few sites flood far less data.
LINK_STATE_REFRESH: Final = 600.0
#: Whole seconds an advertisement lives after its origin made it, unless refreshed: three
#: refresh periods, so two lost refreshes in a row do not drop a live site's links. Carried
#: in the advertisement (at most 65,535), so each origin's choice holds at every site.
LINK_STATE_LIFETIME: Final = 1800
#: A site makes a new advertisement of its own at most this often (OSPF's MinLSInterval is
#: 5 s): links that change together (a restart, many sessions coming up) go out as one,
#: and a flapping link cannot flood the network.
LINK_STATE_MIN_INTERVAL: Final = 1.0

# -- tunnels (qkdd.rotation, qkdd.wireguard, qkdd.ipsec) --------------------------------------

#: Upper bound on one request to the peer about a tunnel key: a hung peer must not stall the
#: loop that enforces max_key_age.
ANNOUNCE_TIMEOUT: Final = 10.0
#: After a failed rotation: try again soon, long before the key gets too old, but do not
#: hammer an empty pool or a peer that is down.
RETRY_BACKOFF: Final = 5.0
#: Before the first key the service is not ready yet; keys usually arrive within seconds of
#: the first peer session, so waiting a full RETRY_BACKOFF would only delay start-up.
STARTUP_RETRY_BACKOFF: Final = 1.0
#: [[wireguard]] defaults. WireGuard itself starts a new handshake every 120 s
#: (REKEY_AFTER_TIME); a new PSK takes effect at the next handshake, so rotating more often
#: buys nothing.
WIREGUARD_DEFAULT_INTERVAL: Final = 120.0
WIREGUARD_DEFAULT_MAX_KEY_AGE: Final = 600.0
WIREGUARD_DEFAULT_STARTUP_TIMEOUT: Final = 15.0
#: Upper bound on one run of `wg`: a hung tool must not stall the loop that enforces
#: max_key_age.
WG_TIMEOUT: Final = 10.0
#: wg's own error messages are short; a cap keeps a misbehaving tool out of the logs.
MAX_STDERR_CHARS: Final = 2000
#: [[ipsec]] defaults. A reauthentication is a new IKE SA (a key exchange and
#: authentication), more work than a WireGuard handshake: rotate every few minutes.
IPSEC_DEFAULT_INTERVAL: Final = 300.0
IPSEC_DEFAULT_MAX_KEY_AGE: Final = 900.0
IPSEC_DEFAULT_STARTUP_TIMEOUT: Final = 15.0
#: Upper bound on one VICI command: a hung charon must not stall the loop that enforces
#: max_key_age.
VICI_TIMEOUT: Final = 10.0
#: How long terminate waits for the peer to confirm the DELETE before charon drops the IKE
#: SA anyway (force): failing closed must not wait for a peer that is gone. Milliseconds,
#: as VICI takes it.
TERMINATE_WAIT_MS: Final = 2000
#: How long a rotation waits for the new IKE SA (a key exchange and IKE_AUTH: well under a
#: second between two hosts), and how often it looks.
REAUTH_WAIT: Final = 10.0
REAUTH_POLL: Final = 0.1

# -- the host (qkdd.config, qkdd.systemd) and the demo (qkdd.demo) ---------------------------

#: A site config is a few KiB; anything this large is the wrong file.
MAX_CONFIG_BYTES: Final = 1024 * 1024
#: A notification to systemd may block if the manager's queue is full; waiting longer than
#: this would stall the event loop, and a lost WATCHDOG=1 is retried at the next ping.
SD_NOTIFY_SEND_TIMEOUT: Final = 1.0
#: `qkdd demo`: how long a step may take (a site or the emulator saying it is ready, the
#: first keys arriving), and how long a process has to stop after SIGTERM before it is
#: killed.
DEMO_STARTUP_TIMEOUT: Final = 25.0
DEMO_STOP_GRACE: Final = 5.0
