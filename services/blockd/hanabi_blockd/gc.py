"""Which base volumes to collect (pure): least recently used first, within a size budget,
never one that a sandbox holds or a provisioning in flight is about to use."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Collection, Iterable


@dataclass(frozen=True)
class BaseUsage:
    """What the collector needs to know of one base."""

    key: str
    bytes: int  # allocated on disk
    last_used: float


def choose_evictions(bases: Iterable[BaseUsage], in_use: Collection[str], budget_bytes: int,
                     incoming_bytes: int = 0) -> list[str]:
    """The keys to remove so the bases (plus `incoming_bytes` about to be built) fit in
    `budget_bytes`; oldest `last_used` first (ties by key, for a stable order). Bases in use
    are never chosen, even when the budget then stays exceeded."""
    bases = list(bases)
    total = sum(b.bytes for b in bases) + incoming_bytes
    chosen = []
    for base in sorted(bases, key=lambda b: (b.last_used, b.key)):
        if total <= budget_bytes:
            break
        if base.key in in_use:
            continue
        chosen.append(base.key)
        total -= base.bytes
    return chosen
