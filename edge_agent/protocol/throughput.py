"""How fast a peer's link carries our transfers, and the deadlines that follow from it.

Pure logic (stdlib only; no clock): callers pass durations they measured. A sender learns the
throughput to each receiver from the transfers it acknowledged; a receiver learns it from each
sender's chunk arrivals. Deadlines scale with the bytes still in flight over the throughput we can
count on: half the measured one (samples are lower bounds already, the margin covers a link that
gets worse), and before any measurement a conservative floor. A slow link then looks slow, not dead:
a 1 MB model over 1 Mbit/s needs ~8 s, a 700 MB hand-off ~100 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FLOOR_BPS = 16_000.0  # bytes/s (128 kbit/s) assumed of a link nothing was measured on, and never less
SAFETY = 2.0  # count on half the measured throughput
MIN_SAMPLE_BYTES = 64 * 1024  # smaller transfers measure latency, not throughput
MIN_SAMPLE_S = 1.0  # a transfer faster than this counts as taking this long (timer granularity)
WEIGHT = 0.5  # weight of a new sample in the moving average


def transfer_deadline_s(in_flight_bytes: int, rate_bps: float, base_s: float) -> float:
    """Seconds to wait for an acknowledgement: a fixed allowance (round trips, the receiver's work)
    plus the time ``in_flight_bytes`` take at ``rate_bps`` bytes/s."""
    if rate_bps <= 0:
        raise ValueError("rate_bps must be positive")
    return base_s + max(0, in_flight_bytes) / rate_bps


def sample_bps(nbytes: int, seconds: float) -> float | None:
    """One throughput measurement (bytes/s), or None if ``nbytes`` is too small to tell throughput
    from latency. Durations under ``MIN_SAMPLE_S`` count as that long, so a sample never overstates."""
    if nbytes < MIN_SAMPLE_BYTES:
        return None
    return nbytes / max(seconds, MIN_SAMPLE_S)


@dataclass
class LinkRates:
    """Throughput per peer: a moving average of samples, and the rate a deadline may count on."""

    floor_bps: float = FLOOR_BPS
    safety: float = SAFETY
    measured: dict[str, float] = field(default_factory=dict)  # peer -> bytes/s

    def observe(self, peer: str, nbytes: int, seconds: float) -> float | None:
        """Record ``nbytes`` carried in ``seconds``; returns the new estimate (None: sample too small)."""
        sample = sample_bps(nbytes, seconds)
        if sample is None:
            return None
        old = self.measured.get(peer)
        self.measured[peer] = sample if old is None else (1 - WEIGHT) * old + WEIGHT * sample
        return self.measured[peer]

    def assumed_bps(self, peer: str) -> float:
        """The throughput a deadline counts on: measured / safety, never below the floor."""
        measured = self.measured.get(peer)
        return self.floor_bps if measured is None else max(self.floor_bps, measured / self.safety)

    def deadline_s(self, peer: str, in_flight_bytes: int, base_s: float) -> float:
        return transfer_deadline_s(in_flight_bytes, self.assumed_bps(peer), base_s)
