"""Typed errors. Each says whose fault it is and what the caller should do about it.

- :class:`RemoteProtocolError`: the peer (an ONTAP node, or something pretending to be one) sent bytes that
  break the protocol. ``close`` says whether the connection must be dropped; ``reason`` is a short, stable
  token used as a metric label.
- :class:`LocalProtocolError`: fpolicyd itself tried to do something the protocol forbids (a bug or misuse).
- :class:`ConfigError`: bad settings; raised at start-up with the key named.
- :class:`SinkError`: a sink failed; ``retriable`` is data, not a guess made by the caller.
"""

from __future__ import annotations


class FpolicydError(Exception):
    """Base of every error fpolicyd raises on purpose."""


class RemoteProtocolError(FpolicydError):
    """The peer broke the protocol."""

    def __init__(self, reason: str, detail: str = "", *, close: bool = True) -> None:
        self.reason = reason
        self.detail = detail
        self.close = close
        super().__init__(f"{reason}: {detail}" if detail else reason)


class LocalProtocolError(FpolicydError):
    """fpolicyd was asked to do something the protocol does not allow."""


class ConfigError(FpolicydError):
    """Settings are invalid; the message names the key."""


class SinkError(FpolicydError):
    """A sink could not take a batch."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        self.retriable = retriable
        super().__init__(message)
