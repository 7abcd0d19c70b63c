"""A database router for a primary and read replicas, each alias pooled on its own.

``DATABASE_ROUTERS = ["django_pooled_pg.routers.ReplicaRouter"]`` sends
writes (and reads inside a transaction on the primary: see below) to
``"default"`` and reads to the first replica alias whose pool is not known to
be down (``django_pooled_pg.unavailable``, no I/O), else to the primary.
Aliases come from the ``POOLED_PG_REPLICAS`` setting (default:
``["replica"]``), or from the constructor when the router is given as an
instance (``ReplicaRouter(primary="default", replicas=["replica"])``).

A replica that dies is known to be down after its pool's first failed
connection attempt: the request that found it out fails with an
``OperationalError`` (``ServerUnavailable``, whose ``alias`` says which,
once the pool knows); the reads after it go to the primary until the pool
connects again, which it keeps trying in the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import registry


class ReplicaRouter:
    """Writes to the primary alias; reads to an available replica, else the primary."""

    def __init__(self, primary: str = "default", replicas: Sequence[str] | None = None) -> None:
        self.primary = primary
        self._replicas = list(replicas) if replicas is not None else None

    @property
    def replicas(self) -> list[str]:
        if self._replicas is not None:
            return self._replicas
        from django.conf import settings

        return list(getattr(settings, "POOLED_PG_REPLICAS", ["replica"]))

    def db_for_read(self, model: Any, **hints: Any) -> str:
        from django.db import connections

        # Inside a transaction on the primary, a read must see its writes.
        if self.primary in connections and connections[self.primary].in_atomic_block:
            return self.primary
        for alias in self.replicas:
            if alias in connections.settings and registry.unavailable(alias) is None:
                return alias
        return self.primary

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return self.primary

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True  # the same data on every alias

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return db not in self.replicas  # replicas get the primary's schema by replication
