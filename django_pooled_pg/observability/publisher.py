"""How every process's stats reach ``manage.py poolstats``: Django's cache.

Each process that has a pool publishes its stats every ``INTERVAL`` seconds
to a slot in a shared cache (``settings.POOLED_PG_STATS["CACHE"]``, default
``"default"``), from a daemon thread. A slot is claimed with ``cache.add``,
searched from a random start and read back (the file cache's ``add`` checks,
then writes: two processes can both think they won), and expires after
three intervals, so a process that died ages out on its own. A reader
fetches every slot in one ``get_many``.

The cache is the transport because every process of a deployment already
reaches it when it is shared (Redis, Memcached, the database cache, files
on one host), and it needs no table or migration of ours. A local-memory or
dummy cache is per process: then nothing is published and poolstats says
it shows its own process only.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from .api import stats
from .records import HOSTNAME, PoolStats

logger = logging.getLogger("django_pooled_pg")

#: Slots a deployment can fill: processes beyond this are not shown.
MAX_PROCESSES = 512
KEY_PREFIX = "django_pooled_pg:stats:"
DEFAULT_INTERVAL = 5.0
_LOCAL_BACKENDS = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)


@dataclass(frozen=True)
class PublishSettings:
    cache: str | None  # alias in CACHES; None: publishing off
    interval: float


def publish_settings() -> PublishSettings:
    """``settings.POOLED_PG_STATS``, validated (ImproperlyConfigured names the key)."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    raw = getattr(settings, "POOLED_PG_STATS", {})
    if not isinstance(raw, dict):
        raise ImproperlyConfigured(
            f"settings.POOLED_PG_STATS is {raw!r}; it must be a dict with the keys "
            "'CACHE' (an alias in CACHES, or None) and 'INTERVAL' (seconds > 0)."
        )
    unknown = set(raw) - {"CACHE", "INTERVAL"}
    if unknown:
        raise ImproperlyConfigured(
            f"settings.POOLED_PG_STATS has unknown keys {sorted(unknown)}; "
            "valid keys: 'CACHE', 'INTERVAL'."
        )
    cache = raw.get("CACHE", "default")
    if cache is not None and (not isinstance(cache, str) or cache not in settings.CACHES):
        raise ImproperlyConfigured(
            f"settings.POOLED_PG_STATS['CACHE'] is {cache!r}; it must be None or one "
            f"of the aliases in CACHES: {', '.join(settings.CACHES)}."
        )
    interval = raw.get("INTERVAL", DEFAULT_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
        raise ImproperlyConfigured(
            f"settings.POOLED_PG_STATS['INTERVAL'] is {interval!r}; it must be a "
            "number of seconds > 0."
        )
    return PublishSettings(cache=cache, interval=float(interval))


def unshared_reason(ts: PublishSettings) -> str | None:
    """Why other processes' stats cannot be seen, or None when they can."""
    from django.conf import settings

    if ts.cache is None:
        return "publishing is off (POOLED_PG_STATS['CACHE'] is None)"
    backend = settings.CACHES[ts.cache].get("BACKEND", "")
    if backend in _LOCAL_BACKENDS:
        return (
            f"cache {ts.cache!r} is {backend.rsplit('.', 1)[-1]}, which other processes "
            "cannot see; set POOLED_PG_STATS['CACHE'] to a shared cache"
        )
    return None


def _slot_key(i: int) -> str:
    return f"{KEY_PREFIX}{i}"


class Publisher:
    """This process's slot in the shared cache, refreshed by a daemon thread."""

    def __init__(self, ts: PublishSettings) -> None:
        assert ts.cache is not None
        self.settings = ts
        self.pid = os.getpid()
        self.ident = f"{HOSTNAME}:{self.pid}:{secrets.token_hex(4)}"
        self.slot: int | None = None
        self.ttl = max(3 * ts.interval, 1.0)
        self._thread = threading.Thread(
            target=self._run, name="django_pooled_pg-stats-publisher", daemon=True
        )
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from django.db import connections

        while True:  # a daemon thread: it ends with the process
            try:
                self.publish()
                if self._failing:
                    logger.info("stats publishing to cache %r works again", self.settings.cache)
                    self._failing = False
            except Exception as exc:  # the cache is down: try again later
                if not self._failing:
                    logger.warning(
                        "cannot publish pool stats to cache %r: %s", self.settings.cache, exc
                    )
                    self._failing = True
            finally:
                # A database cache checked out connections in this thread.
                connections.close_all()
            time.sleep(self.settings.interval)

    def publish(self) -> None:
        from django.core.cache import caches

        cache = caches[self.settings.cache]  # type: ignore[index]
        payload = {
            "ident": self.ident,
            "host": HOSTNAME,
            "pid": self.pid,
            "time": time.time(),
            "pools": [s.to_dict() for s in stats().values() if s.live.open],
        }
        if self.slot is not None:
            key = _slot_key(self.slot)
            current = cache.get(key)
            if current is not None and current.get("ident") == self.ident:
                cache.set(key, payload, self.ttl)
                return
            if current is None and cache.add(key, payload, self.ttl):
                return
        start = secrets.randbelow(MAX_PROCESSES)
        for n in range(MAX_PROCESSES):
            i = (start + n) % MAX_PROCESSES
            if not cache.add(_slot_key(i), payload, self.ttl):
                continue
            current = cache.get(_slot_key(i))
            if current is not None and current.get("ident") == self.ident:
                self.slot = i
                return
        self.slot = None
        logger.warning("no free stats slot among %d: this process is not shown", MAX_PROCESSES)


_publisher: Publisher | None = None
_decided_in: int | None = None  # the pid that decided whether to publish
_publisher_lock = threading.Lock()


def ensure_publishing(*_: Any) -> None:
    """Start this process's publisher once (again in a forked child).

    Called whenever a pool opens (the app hooks it to the registry's
    ``on_pool_opened``), so a process without a pool publishes nothing.
    """
    global _publisher, _decided_in
    if _decided_in == os.getpid():
        return
    with _publisher_lock:
        if _decided_in == os.getpid():
            return
        _publisher = None  # a parent's publisher thread does not exist here
        try:
            ts = publish_settings()
        except Exception as exc:
            logger.warning("pool stats are not published: %s", exc)
            ts = PublishSettings(cache=None, interval=DEFAULT_INTERVAL)
        if unshared_reason(ts) is None:
            _publisher = Publisher(ts)
            _publisher.start()
        _decided_in = os.getpid()


@dataclass
class Deployment:
    """Every process's stats that the transport holds, and what went wrong."""

    processes: list[PoolStats]  # one per (process, alias), this process excluded
    error: str | None  # the transport could not be read: why
    note: str | None  # the transport is not shared: why


def read_deployment() -> Deployment:
    """The stats other processes published, fresh ones only."""
    try:
        ts = publish_settings()
    except Exception as exc:
        return Deployment([], None, str(exc))
    if (why := unshared_reason(ts)) is not None:
        return Deployment([], None, why)
    from django.core.cache import caches

    assert ts.cache is not None
    try:
        found: dict[str, Any] = caches[ts.cache].get_many(
            [_slot_key(i) for i in range(MAX_PROCESSES)]
        )
    except Exception as exc:
        return Deployment([], f"cache {ts.cache!r} cannot be read: {exc}", None)
    oldest = time.time() - max(3 * ts.interval, 1.0)
    me = os.getpid()
    out: list[PoolStats] = []
    for payload in found.values():
        if not isinstance(payload, dict) or payload.get("time", 0) < oldest:
            continue  # a process that stopped publishing
        if payload.get("host") == HOSTNAME and payload.get("pid") == me:
            continue  # this process: read live instead
        for data in payload.get("pools", []):
            try:
                out.append(PoolStats.from_dict(data))
            except (KeyError, TypeError):
                continue  # another version of the schema
    return Deployment(out, None, None)
