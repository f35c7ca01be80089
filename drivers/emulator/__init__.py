"""The ``qkd-emulator`` BB84 link emulator: a QKD link without hardware, speaking the device
side of the serial protocol (``drivers/PROTOCOL.md``) on pseudo-terminals.

Modules, from the command down:

* ``command``: the ``qkd-emulator`` entry point (``pty``, ``half``, ``simulate``).
* ``half``: one half of a link on a site host of its own, the other half over TCP;
  ``fibre_protocol``: the sans-IO wire format and state machine between the two halves.
* ``device_side``: the device end of the serial protocol on a byte stream, and two such
  ends fed the same keys; ``ptys``: the pseudo-terminals they are exposed on.
* ``key_source``: where keys come from (``KeySource``, random keys); ``bb84_source``: keys
  out of the simulated BB84 link; ``simulate``: its flags and the offline report.
* ``physics`` (source, channel, clicks) with ``detectors``; ``postprocessing`` (sifting,
  estimation, ``cascade``, verification, ``toeplitz`` privacy amplification) with the
  ``finite_key`` bounds; ``bitarrays``: the bit strings they share.

Nothing is imported here, so ``qkdd_drivers`` users that only need a module of the
emulator (tests, benches) do not load the rest.
"""
