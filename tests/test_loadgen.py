"""The load generator's bookkeeping gives the figures it would give recording live."""

from __future__ import annotations

import random

from bench._loadgen import LOWEST_NS, _Tally, new_histogram


def test_latencies_recorded_after_the_run_give_the_live_histograms() -> None:
    rng = random.Random(7)
    tally = _Tally(start_ns=10**9)
    live_e2e, live_ack = new_histogram(), new_histogram()
    live_seconds = {second: new_histogram() for second in range(4)}
    for _ in range(5000):
        second = rng.randrange(4)
        now = tally.start_ns + second * 10**9 + rng.randrange(10**9)
        latency = max(LOWEST_NS, int(rng.lognormvariate(15, 2)))
        tally.record_delivery(now, latency)
        live_e2e.record_value(latency)
        live_seconds[second].record_value(latency)
        tally.ack_ns.append(latency // 2)
        live_ack.record_value(latency // 2)

    e2e, ack, series_p99 = tally.histograms()

    assert e2e.encode() == live_e2e.encode()
    assert ack.encode() == live_ack.encode()
    assert {s: h.encode() for s, h in series_p99.items()} == {
        s: h.encode() for s, h in live_seconds.items()
    }
    assert e2e.get_value_at_percentile(99) == live_e2e.get_value_at_percentile(99)
