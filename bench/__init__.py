"""Load generators and ceiling measurements for msgnet (see docs/performance.md)."""

from __future__ import annotations

__all__: list[str] = []
