"""Back-off for actions that keep failing: each failure doubles the wait before the next try.

Keyed by load name, and tied to what was tried (`fingerprint`: the object, cgroup and mode): when
the desired state changes, the new version is tried at once, whatever failed before.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Failure:
    fingerprint: str
    count: int
    retry_at: float
    error: str


class Backoff:
    def __init__(self, base: float = 1.0, limit: float = 300.0) -> None:
        self.base, self.limit = base, limit
        self._failures: dict[str, _Failure] = {}

    def delay(self, count: int) -> float:
        return min(self.limit, self.base * 2 ** max(0, count - 1))

    def blocked(self, key: str, fingerprint: str, now: float) -> _Failure | None:
        """The failure that holds `key` back, if it is not yet time to try it again."""
        f = self._failures.get(key)
        if f is None or f.fingerprint != fingerprint or now >= f.retry_at:
            return None
        return f

    def failed(self, key: str, fingerprint: str, now: float, error: str) -> float:
        """Record a failure; returns the seconds until the next try."""
        f = self._failures.get(key)
        count = f.count + 1 if f is not None and f.fingerprint == fingerprint else 1
        wait = self.delay(count)
        self._failures[key] = _Failure(fingerprint, count, now + wait, error)
        return wait

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def forget_except(self, keys: set[str]) -> None:
        for k in set(self._failures) - keys:
            del self._failures[k]
