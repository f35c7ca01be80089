"""The site's key store, split by what each part holds (``qkdd.keystore.KeyStore`` joins
them over one SQLite database and its transactions):

- ``records``: the records the store hands to its callers and its parts share;
- ``key_blocks``: application keys, held as sealed chunks of the blocks key agreement
  makes, and the pool's ready counts;
- ``assigned_keys``: keys of other sizes or for several slaves, made from whole keys;
- ``pads``: one-time pads for one-time-pad messages;
- ``schema``: the store's schema version, and the upgrade of older stores on open.
"""
