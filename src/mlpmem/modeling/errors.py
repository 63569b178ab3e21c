"""User-facing errors: what is wrong and how to fix it. The CLI prints them as one paragraph, without a traceback.

The one definition of the error every layer raises (``mlpmem.errors`` re-exports it); it lives in
``modeling/`` so that an exported model's remote code carries it without mlpmem.
"""

from __future__ import annotations


class MlpmemError(Exception):
    """Something the user can fix: says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.problem}. {self.fix}." if self.fix else f"{self.problem}."
