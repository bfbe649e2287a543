"""What a pipeline step tells the task shell that runs it (the shell enqueues; steps never do)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepOutcome:
    state: str | None  # the row's state after the step; None when there is no such row
    reason: str | None = None
    retry_in: float | None = None  # call the step again for this row after this many seconds
    next_ids: list[int] = field(default_factory=list)  # rows ready for the next step (committed)
    again_ids: list[int] = field(default_factory=list)  # other rows this same step should now take up
    # wall-clock (epoch seconds) start and end of the work done with no transaction open: shown in the task
    # result (Flower) and how the tests prove two workers really work at the same time
    work: tuple[float, float] | None = None
