"""The divergence guard: training stops, before a checkpoint is written, when the loss says the
model broke. The non-finite guard (trainer `_nonfinite`) catches NaN and infinity; this one
catches a finite loss that went where fine-tuning never takes it:

- the loss reached ln(vocabulary size), what a model guessing uniformly scores (``lr = 1e6``
  lands there: the weights saturate, the gradient norm drops to 0), from a running median
  clearly below it;
- the loss is more than ``factor`` times the median of the last `WINDOW` applied steps, the
  median taken as at least `MEDIAN_FLOOR` × ln(V): late in a run the median of well-learned
  own answers can be a few hundredths of a nat, and a batch of harder gold answers is no
  divergence.

``factor`` is train.divergence_factor; 0 turns both checks off. A randomly initialized model
starts at about ln(V), so the first check waits for a median at least `UNIFORM_MARGIN` below it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

WINDOW = 32  # applied steps the running median covers
# The first check needs a median this far below ln(V) (a model that learned something) and
# fires at this far below it (a softmax near uniform scores a hair under ln(V)).
UNIFORM_MARGIN = 0.1  # fraction of ln(V)
UNIFORM_TOLERANCE = 0.01
MEDIAN_FLOOR = 0.05  # fraction of ln(V): 0.54 nats for a 49,152-token vocabulary


class DivergenceGuard:
    """Feed it each applied step's loss; it says why training must stop, or None."""

    def __init__(self, vocab_size: int, factor: float) -> None:
        self.uniform = math.log(vocab_size) if vocab_size > 1 else math.inf
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=WINDOW)

    def check(self, loss: float) -> str | None:
        """Why ``loss`` (finite) means divergence, or None (then it joins the window)."""
        if self.factor > 0 and self.recent:
            median = statistics.median(self.recent)
            n = len(self.recent)
            near_uniform = loss >= self.uniform * (1 - UNIFORM_TOLERANCE)
            if near_uniform and median < self.uniform * (1 - UNIFORM_MARGIN):
                return (
                    f"loss {loss:.4f} reached ln(vocabulary size) = {self.uniform:.4f}, a model "
                    f"guessing uniformly, from a median of {median:.4f} over the last {n} steps"
                )
            if loss > self.factor * max(median, MEDIAN_FLOOR * self.uniform):
                return (
                    f"loss {loss:.4f} is more than train.divergence_factor={self.factor:g} times "
                    f"the median {median:.4f} of the last {n} steps"
                )
        self.recent.append(loss)
        return None
