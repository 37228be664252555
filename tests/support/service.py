"""The ``with`` shape of every process a test starts: cleaned up even when starting fails."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class TestService(ABC):
    """Started on ``with``, closed on leaving it or on a start that failed halfway."""

    __test__ = False  # not a test class, whatever pytest's name pattern says

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Stop and clean up; safe after a partial start and when called twice."""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
