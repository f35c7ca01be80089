"""Keys between sites without a direct QKD link, relayed through trusted sites.

- ``link_state``: a site's link-state database (sans-IO): LINK_STATE advertisements, their
  byte format, flooding, refresh and expiry (docs/protocol.md §11).
- ``relay_routes``: shortest paths over the two-way links of that database, with static
  next hops from config taking precedence (docs/protocol.md §11).
- ``hop_seal``: one hop of relayed QKD material sealed information-theoretically (one-time
  pad, Poly1305 under a one-time QKD key) and the byte format of RELAY_KEYS and RELAY_ACK
  (docs/protocol.md §10).
- ``relay_state``: a site's relayed transfers as source, relay or destination (sans-IO):
  what it sends, what it holds until which ACK or confirmation, deadlines (§10.4).
"""
