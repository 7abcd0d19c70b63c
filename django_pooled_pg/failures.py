"""When the pool cannot serve: failed connection attempts, fail-fast, exhaustion.

``Outage`` remembers since when every connection attempt has failed and the
last cause; the pool asks it whether to fail a checkout at once
(``fail_fast``) and builds ``ServerUnavailable`` from it. ``exhausted()``
words ``PoolExhausted`` with the pool's state and the remedy.
``ReconnectAttempt`` bounds how long the pool waits between attempts.
"""

from __future__ import annotations

import logging
from time import monotonic

from psycopg_pool.base import AttemptWithBackoff

from .errors import PoolExhausted, ServerUnavailable

logger = logging.getLogger("django_pooled_pg")

#: Longest wait between two attempts to open a connection to a server that
#: refused the last one (seconds): a bounded rate, a quick recovery.
RECONNECT_DELAY_MAX = 0.5


class ReconnectAttempt(AttemptWithBackoff):
    """psycopg_pool's backoff, starting at 50 ms and capped at RECONNECT_DELAY_MAX.

    psycopg_pool retries a failed connect after 1 s, then doubles the wait
    up to reconnect_timeout: after a minute-long outage the pool could stay
    empty a minute after the server is back.
    """

    INITIAL_DELAY = 0.05

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_DELAY_MAX)


class Outage:
    """Since when every connection attempt of one pool has failed, and why."""

    __slots__ = ("since", "cause")

    def __init__(self) -> None:
        self.since: float | None = None  # None: the last attempt succeeded
        self.cause = ""

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def failing_for(self, now: float | None = None) -> float:
        if self.since is None:
            return 0.0
        return (monotonic() if now is None else now) - self.since

    def attempt_failed(self, exc: BaseException) -> bool:
        """Record a failed attempt; True if it is the first of an outage."""
        # psycopg's messages name the host, port, user and cause, never the
        # password.
        self.cause = " ".join(str(exc).split()) or type(exc).__name__
        if self.since is None:
            self.since = monotonic()
            return True
        return False

    def attempt_succeeded(self) -> float | None:
        """Record a success; how long the outage it ends lasted, if one did."""
        if self.since is None:
            return None
        lasted = monotonic() - self.since
        self.since = None
        return lasted

    def unavailable(self, alias: str, server_role: str = "") -> ServerUnavailable:
        failing_for = self.failing_for()
        return ServerUnavailable(
            f"Database alias {alias!r} is unavailable: connection attempts have "
            f"failed for {failing_for:.1f} s, the last with: {self.cause.rstrip('.')}. "
            "The pool keeps retrying and serves again as soon as one succeeds "
            "(pool option fail_fast=False makes checkouts wait up to timeout instead).",
            alias=alias,
            cause=self.cause,
            failing_for=failing_for,
            server_role=server_role,
        )


def exhausted(
    name: str,
    alias: str,
    why: str,
    *,
    max_size: int,
    in_use: int,
    waiting: int,
    waited: float,
    outage: Outage,
    holders: list[tuple[str, float]] | None = None,
) -> PoolExhausted:
    """PoolExhausted with the pool's state and what to do, logged at WARNING.

    *holders*: (holder, seconds held) of the connections in use, longest first.
    """
    held_by = f" Held by: {describe_holders(holders)}." if holders else ""
    cause = ""
    if outage.ongoing:
        cause = (
            f" Connection attempts have been failing for "
            f"{outage.failing_for():.1f} s: {outage.cause}."
        )
    logger.warning(
        "pool %r exhausted: %s (max_size=%d, in use=%d, waiting=%d, waited %.2f s)%s",
        name,
        why,
        max_size,
        in_use,
        waiting,
        waited,
        held_by,
    )
    return PoolExhausted(
        f"Connection pool for database alias {alias!r} exhausted: {why} "
        f"(max_size={max_size}, in use={in_use}, waiting={waiting}, "
        f"waited {waited:.2f} s).{held_by}{cause} Return connections sooner, raise "
        "max_size, or raise timeout.",
        alias=alias,
        max_size=max_size,
        in_use=in_use,
        waiting=waiting,
        waited=waited,
    )


def describe_holders(holders: list[tuple[str, float]], most: int = 5) -> str:
    """``demoapp.views.report x3 (longest 4.2 s), ...``: who holds the connections."""
    by_name: dict[str, list[float]] = {}
    for name, seconds in holders:
        by_name.setdefault(name, []).append(seconds)
    ranked = sorted(by_name.items(), key=lambda item: (-len(item[1]), -max(item[1])))
    parts = [
        f"{name} x{len(held)} (longest {max(held):.1f} s)" if len(held) > 1 else
        f"{name} ({held[0]:.1f} s)"
        for name, held in ranked[:most]
    ]  # fmt: skip
    if len(ranked) > most:
        parts.append(f"{len(ranked) - most} more")
    return ", ".join(parts)
