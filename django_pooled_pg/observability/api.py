"""``django_pooled_pg.stats()``: this process's pools, as PoolStats."""

from __future__ import annotations

from typing import overload

from .. import registry
from .records import PoolConfig, PoolStats, existing_record, record_for


def pooled_aliases() -> list[str]:
    """The configured aliases that use this engine with pooling on."""
    from django.db import connections

    from ..base import DatabaseWrapper

    found = []
    for alias in connections:
        wrapper = connections[alias]
        if isinstance(wrapper, DatabaseWrapper) and wrapper.pooled:
            found.append(alias)
    return found


def _config_of_unused(alias: str) -> PoolConfig:
    """The configuration of an alias whose pool was never made here."""
    from django.db import connections

    from ..base import DatabaseWrapper

    if alias not in connections:
        raise ValueError(f"no database alias {alias!r}; configured: {', '.join(connections)}")
    wrapper = connections[alias]
    if not isinstance(wrapper, DatabaseWrapper) or not wrapper.pooled:
        raise ValueError(
            f"database alias {alias!r} does not use a django_pooled_pg pool "
            f"(ENGINE {wrapper.settings_dict['ENGINE']!r})"
        )
    s = wrapper.settings_dict
    return PoolConfig.build(
        (s["HOST"], str(s["PORT"]), s["NAME"]), s["USER"], wrapper.pool_options().shown()
    )


def snapshot(alias: str) -> PoolStats:
    """This process's stats for one alias: ValueError if it is not pooled here."""
    open_pools = [p for p in registry.find(alias) if not p.closed]
    pool = open_pools[-1] if open_pools else None
    record = existing_record(alias)
    if pool is not None:
        config = pool.config
    elif record is not None and record.config is not None:
        config = record.config  # its pool was closed
    else:
        config = _config_of_unused(alias)
    return record_for(alias).snapshot(pool.live_state() if pool else None, config)


@overload
def stats(alias: str) -> PoolStats: ...
@overload
def stats(alias: None = None) -> dict[str, PoolStats]: ...
def stats(alias: str | None = None) -> PoolStats | dict[str, PoolStats]:
    """What this process's pools are doing.

    ``stats("default")`` gives one alias (ValueError if it is not a pooled
    alias); ``stats()`` gives every pooled alias, configured or used in this
    process, by alias. Counters and distributions are zero and ``live.open``
    is False for an alias whose pool was not used yet.
    """
    if alias is not None:
        return snapshot(alias)
    aliases = dict.fromkeys(pooled_aliases())
    aliases.update(dict.fromkeys(p.alias for p in registry.find()))
    return {a: snapshot(a) for a in aliases}
