"""A token bucket that limits how fast one connection may make requests."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Allows ``rate`` requests per second on average and ``burst`` at once.

    The clock is passed in so that the bucket follows trio's clock in the server
    (and its autojump clock in tests) without knowing about trio.
    """

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float]) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def try_take(self) -> bool:
        """Spend one token if there is one; False means the request is refused."""
        now = self._clock()
        self._tokens = min(
            self._burst, self._tokens + (now - self._updated) * self._rate
        )
        self._updated = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
