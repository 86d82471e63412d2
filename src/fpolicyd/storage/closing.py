"""``with`` support shared by the storage objects that are open once built and closed by their ``close()``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

__all__ = ["ClosedOnExit"]


class ClosedOnExit(ABC):
    """``with obj:`` gives ``obj`` as it is (already open) and calls ``obj.close()`` at the end, whatever happened."""

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Release what the object holds; safe to call twice."""
