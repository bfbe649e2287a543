"""Which faces a person should label first: the faces page's "most useful first" order, as a pure function
of what a face row already holds (label source, suggestion and its probability, an inferred label's margin,
a tag label's doubt) and how many labelled faces its character has: usefulness = doubt x rarity x
plausibility, in [0, 1]. The terms and their measurement: docs/model.md, "Most useful first".
"""

from __future__ import annotations

RARE = 20.0  # labelled faces at which a character's rarity weight is one half
UNTAGGED = 0.25  # weight of an ambiguous face whose suggestion its post is not tagged with
NO_SUGGESTION = 0.5  # doubt of an ambiguous face the model has not judged yet


def usefulness(
    label_source: str | None,
    suggestion_score: float | None = None,
    inferred_margin: float | None = None,
    doubt_score: float | None = None,
    labelled: int = 0,
    suggestion_tagged: bool = True,
) -> float:
    """The expected value of a person labelling this face (see the module's doc); 0 for nothing to gain."""
    if label_source in (None, "ambiguous"):
        doubt = NO_SUGGESTION if suggestion_score is None else 1.0 - float(suggestion_score)
        if suggestion_score is not None and not suggestion_tagged:
            doubt *= UNTAGGED
    elif label_source == "inferred":
        doubt = 1.0 - min(1.0, float(inferred_margin or 0.0))
    elif label_source == "tag" and doubt_score is not None:
        doubt = 1.0 - float(doubt_score)
    else:
        return 0.0
    return max(0.0, doubt) * RARE / (RARE + max(0, labelled))
