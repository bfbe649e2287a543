"""The self-training loop's rule: after a retrain, how much the inference pass changed the inferred labels,
and whether that calls for a follow-up retrain (WAIFU_SELFTRAIN_MAX_ROUNDS, WAIFU_SELFTRAIN_MIN_CHANGE).
Promotion is untouched: a follow-up is kept only if it beats the current model on today's test split."""

from __future__ import annotations

from typing import Any

from core.settings import Settings


def inferred_change(counts: dict[str, Any]) -> tuple[int, float]:
    """(labels changed, share of the inferred set before or after) from labels.weak.infer_labels' counts:
    new, relabelled and reverted labels over the union of the sets before and after the pass."""
    changed = int(counts.get("new", 0)) + int(counts.get("relabelled", 0)) + int(counts.get("reverted", 0))
    union = int(counts.get("inferred", 0)) + int(counts.get("reverted", 0))
    return changed, (changed / union if union else 0.0)


def follow_up(summary: dict[str, Any], loop_round: int, settings: Settings) -> tuple[bool, str]:
    """(schedule another retrain?, why) after the retrain of round `loop_round` summarised by `summary`."""
    counts = summary.get("inferred") or {}
    if not settings.weak_labels or "reason" in counts:
        return False, "no inference pass: nothing for a follow-up to learn"
    changed, share = inferred_change(counts)
    if share < settings.selftrain_min_change or changed == 0:
        return False, (f"steady: {changed} inferred labels changed ({share:.1%} < {settings.selftrain_min_change:.0%})")
    if loop_round >= settings.selftrain_max_rounds:
        return False, f"{changed} inferred labels changed ({share:.1%}), but {loop_round} follow-ups in a row already"
    return True, f"{changed} inferred labels changed ({share:.1%}): follow-up {loop_round + 1}"
