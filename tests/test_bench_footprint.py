"""bench/bench_footprint.py runs in its quick mode and prints its table: each store (ready
hybrid keys, buffered QKD keys) measured with a small and a large number of keys. A bench
that crashes or measures nothing fails here; no figure is compared with a target."""

from __future__ import annotations

import re

from bench_quick import FIGURE, run_quick

# | store holds | keys | store MB | start -> READY s | RSS at READY MB | RSS after idle MB |
# peak RSS MB | idle CPU % of a core |
ROW = r"^\| {label} \| {keys} \| " + r" \| ".join([FIGURE] * 6) + r" \|$"


def test_quick_mode_prints_the_footprint_table() -> None:
    stdout = run_quick("bench_footprint.py", 600)
    lines = stdout.splitlines()
    for label in ("ready hybrid keys", "buffered QKD keys"):
        for keys in ("1,000", "20,000"):
            pattern = ROW.format(label=re.escape(label), keys=keys)
            matches = [m for line in lines if (m := re.match(pattern, line))]
            assert len(matches) == 1, f"no row {label!r} {keys} in:\n{stdout}"
            size, ready, rss, rss_idle, peak, cpu = (
                float(g.replace(",", "")) for g in matches[0].groups()
            )
            # Idle CPU may rightly round to zero; everything else was measured.
            assert min(size, ready, rss, rss_idle, peak) > 0 and cpu >= 0, stdout
        assert any(line.startswith(f"| {label} | ratio ") for line in lines), stdout
    assert re.search(r"^floor: .* [\d.]+ s, peak RSS [\d.]+ MB$", stdout, re.M), stdout
