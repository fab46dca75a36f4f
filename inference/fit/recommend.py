"""Choose among a box's variants for a stated workload: full MoE only where it fits with room to serve."""

from __future__ import annotations

from dataclasses import dataclass

from .report import FitReport
from .roofline import FITS

# An interactive reader needs about this many tokens/s per user (a fast reader, ~10 words/s), so a variant
# whose bound per user falls below it is too slow for the stated number of users.
MIN_TOKENS_PER_USER = 10.0


@dataclass(frozen=True)
class Recommendation:
    """The chosen variant (or None) and, per variant, why it was or was not chosen."""

    choice: str | None
    reasons: dict[str, str]

    def to_dict(self) -> dict:
        """Return the recommendation as JSON-ready values."""
        return {"choice": self.choice, "reasons": dict(self.reasons)}


def _per_user_rate(report: FitReport, users: int) -> float | None:
    """Return the decode bound per user at the largest measured batch not above `users`."""
    rows = [r for r in report.decode if r.get("tokens_per_s") and r["batch"] <= max(1, users)]
    if not rows:
        return None
    row = max(rows, key=lambda r: r["batch"])
    return row["tokens_per_s"] / row["batch"]


def recommend(reports: list[FitReport], users: int, min_tokens_per_user: float = MIN_TOKENS_PER_USER) -> Recommendation:
    """Return the largest variant that fits in memory, holds `users` sequences and stays fast enough for them."""
    reasons: dict[str, str] = {}
    good = []
    for r in reports:
        v = r.verdict
        rate = _per_user_rate(r, users)
        if v["verdict"] != FITS:
            reasons[r.name] = f"{v['verdict']} (margin {v['margin_gb']:+.0f} GB)"
        elif v["max_concurrent"] < users:
            reasons[r.name] = f"fits, but only {v['max_concurrent']} sequences of {r.context} tokens, not {users}"
        elif rate is not None and rate < min_tokens_per_user:
            reasons[r.name] = f"fits {users} users, but at most {rate:.1f} tokens/s each"
        else:
            good.append(r)
            reasons[r.name] = f"fits {users} users with {v['margin_gb']:.0f} GB margin" + (
                f", up to {rate:.0f} tokens/s each" if rate else "")
    # Among the ones that serve the workload, more parameters is the better model; MoE idleness is the
    # price the buyer already accepted when it fits with room for KV and batch.
    choice = max(good, key=lambda r: r.accounting.total).name if good else None
    return Recommendation(choice, reasons)
