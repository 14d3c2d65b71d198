"""The thinking budget: a per-sample state machine that forces ``</think>`` when thinking runs long.

Per sample it counts the tokens generated after an open ``<think>`` (one opened in the prompt counts
too: that is how a thinking-mode chat prompt ends). When the count reaches the budget and ``</think>``
has not come, the next tokens are *forced*: ``</think>`` and then an optional bridge text's tokens
(e.g. "Time is up; the answer:"), after which sampling continues with the answer. Budget 0 is the
non-thinking mode: an open think block in the prompt is closed at once (an empty think block).
Forcing replaces the sampled token, so it holds for every sampler and every row of a batch.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

BEFORE, THINKING, CLOSED = "before", "thinking", "closed"


@dataclass
class BudgetState:
    budget: int | None  # None: unlimited
    state: str = BEFORE
    count: int = 0  # thinking tokens so far (between <think> and </think>)
    forced: deque = field(default_factory=deque)


class ThinkingBudget:
    """Tracks every sample of a batch. ``forced_token(i)`` before sampling, ``update(i, tok)`` after."""

    def __init__(self, think_id: int, end_think_id: int, budgets: Sequence[int | None],
                 bridge_ids: Sequence[int] = ()):
        self.think_id, self.end_think_id = think_id, end_think_id
        self.bridge_ids = list(bridge_ids)
        self.samples = [BudgetState(b) for b in budgets]

    def start(self, prompts: Sequence[Sequence[int]]) -> None:
        """Read each prompt: an open ``<think>`` (no ``</think>`` after it) starts thinking."""
        for s, prompt in zip(self.samples, prompts):
            for tok in prompt:
                self._advance(s, tok)

    def forced_token(self, i: int) -> int | None:
        s = self.samples[i]
        if not s.forced and s.state == THINKING and s.budget is not None and s.count >= s.budget:
            s.forced.extend([self.end_think_id, *self.bridge_ids])
        return s.forced.popleft() if s.forced else None

    def update(self, i: int, token: int) -> None:
        self._advance(self.samples[i], token)

    def _advance(self, s: BudgetState, tok: int) -> None:
        if s.state == BEFORE and tok == self.think_id:
            s.state, s.count = THINKING, 0
        elif s.state == THINKING:
            if tok == self.end_think_id:
                s.state = CLOSED
            else:
                s.count += 1

    def forced_length(self) -> int:
        """Tokens a forced close takes (``</think>`` + bridge): the budget must leave room for them."""
        return 1 + len(self.bridge_ids)
