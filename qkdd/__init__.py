"""qkdd: a site daemon handing out hybrid keys (ML-KEM + QKD) to local applications over the
ETSI GS QKD 014 API, with ML-DSA-authenticated peering between sites."""

__version__ = "0.1.0"
