"""Which faces a person should label first: the faces page's "most useful first" order, as a pure function
of what a face row already holds (its label source, the model's suggestion and its probability, an
inferred label's margin, a tag label's doubt) and how many labelled faces its character has.

usefulness = doubt x rarity x plausibility, in [0, 1]:

- doubt: how much a person's word would change what the model trains on: an ambiguous face 1 - its
  suggestion's probability (0.5 with no suggestion yet), an inferred label 1 - its margin (the chance it
  is wrong), a doubtful tag label (left out of training) 1 - its doubt score (the chance the tag was right
  after all and the face goes back in); any other label 0;
- rarity: `RARE / (RARE + n)` with n the labelled faces of the face's character (its label, else its
  suggestion): a face of a character with few faces teaches the model most;
- plausibility: an ambiguous face suggested as a character its post is not tagged with is most likely
  someone untracked (labelling it teaches nothing): x `UNTAGGED`.

Measured against labelling at random with bench/active.py (docs/model.md, "Most useful first").
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
