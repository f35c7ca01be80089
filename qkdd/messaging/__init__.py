"""Secure messages between applications at different sites: `messenger` seals, sends, opens
and stores them (one-time keys from hybrid keys or one-time pads, the MESSAGE peer call),
`inbox` holds those received until their recipient acknowledges them, and `routes` are their
HTTP routes beside the ETSI API.
"""
