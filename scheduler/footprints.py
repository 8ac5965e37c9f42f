"""Measured model footprints, as data the planner reads: weights bytes at load and activation peaks per (batch size,
padded tokens). workers/profiles.py stores them (in memory, or in Postgres for the next start)."""

from __future__ import annotations

from dataclasses import dataclass, field


def token_bucket(tokens: int) -> int:
    """Round padded lengths up to a power of two (at least 16) so profiles stay small."""
    bucket = 16
    while bucket < tokens:
        bucket *= 2
    return bucket


@dataclass
class ModelProfile:
    model: str
    device_kind: str
    dtype: str
    weights_bytes: int
    activations: dict[str, int] = field(default_factory=dict)   # "batch:token_bucket" -> peak bytes
    tuned_batch: int | None = None   # the background batch size the tuner last settled on

    def observe(self, batch_size: int, tokens: int, peak_bytes: int) -> bool:
        key = f"{batch_size}:{token_bucket(tokens)}"
        if peak_bytes > self.activations.get(key, -1):
            self.activations[key] = peak_bytes
            return True
        return False

    def activation_reserve(self) -> int:
        """Headroom to keep next to the weights: the largest activation peak measured so far."""
        return max(self.activations.values(), default=0)

    def activation_for(self, batch_size: int, tokens: int) -> int | None:
        """Estimated activation peak of a batch, from measurements only. Within what was measured, the smallest
        peak of a batch at least as large bounds it. Beyond it, peaks grow with items x tokens on top of fixed
        costs (workspaces, first-call allocations), so the growth rate is the slope between the two largest
        measured batches; with a single measurement there is no estimate (and no cap: an OOM, if it comes, is
        recovered and teaches the tuner)."""
        if not self.activations:
            return None
        area = batch_size * token_bucket(tokens)
        by_area: dict[int, int] = {}
        for key, peak in self.activations.items():
            b, t = (int(x) for x in key.split(":"))
            by_area[b * t] = max(peak, by_area.get(b * t, 0))
        samples = sorted(by_area.items())
        larger = [peak for a, peak in samples if a >= area]
        if larger:
            return min(larger)
        if len(samples) < 2:
            return None
        (a1, p1), (a2, p2) = samples[-2], samples[-1]
        slope = max(0.0, (p2 - p1) / (a2 - a1))
        return int(p2 + slope * (area - a2))
