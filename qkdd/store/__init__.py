"""The site's key store, split by what each part holds (``qkdd.keystore.KeyStore`` joins
them over one SQLite database and its transactions):

- ``database``: the connection, transactions and the commit count, opening the store,
  the ``meta`` and ``counters`` tables and flags, and the quarantine of rows that do not
  open; the base the other parts build on;
- ``records``: the records the store hands to its callers and its parts share;
- ``qkd_buffer``: QKD keys waiting to be agreed and the QKD key IDs already used, held as
  frames (``qkd_frames``) and named by ID and in runs (``qkd_ids``); found by ID through
  ``qkd_lookup``; lined up with the peer's buffer by ``qkd_alignment``;
- ``batches``: the batches keys are agreed in, and the peer's store identity;
- ``key_blocks``: application keys, held as sealed chunks of the blocks key agreement
  makes, and the pool's ready counts;
- ``assigned_keys``: keys of other sizes or for several slaves, made from whole keys;
- ``application_keys``: application keys by ID, agreed or assigned, and their expiry;
- ``pads``: one-time pads for one-time-pad messages;
- ``auth_keys``: authentication keys, the PSK chain and the bootstrap allowance;
- ``schema``: the store's schema version, and the upgrade of older stores on open.
"""
