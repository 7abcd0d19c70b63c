"""What the fault scripts share: Django set up bare, a private server, a pooled wrapper."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "testproject"), str(ROOT)]

import throwaway_pg  # noqa: E402


def setup_django() -> None:
    from django.conf import settings

    settings.configure(USE_TZ=True, TIME_ZONE="UTC", INSTALLED_APPS=[])
    import django

    django.setup()


def private_server() -> throwaway_pg.ThrowawayServer:
    """A throwaway cluster with a database ``private``; call destroy() after."""
    server = throwaway_pg.ThrowawayServer(bindir=throwaway_pg.find_bindir())
    server.init()
    server.start()
    server.createdb("private")
    return server


def pooled_wrapper(
    server: throwaway_pg.ThrowawayServer,
    alias: str,
    port: int | None = None,
    options: dict[str, Any] | None = None,
    **pool: Any,
) -> Any:
    """A pooled DatabaseWrapper on *server* (or on *port*, a proxy in front of it)."""
    from django_pooled_pg.base import DatabaseWrapper

    settings: dict[str, Any] = {
        "ENGINE": "django_pooled_pg",
        "NAME": "private",
        "USER": server.user,
        "PASSWORD": server.password,
        "HOST": server.host,
        "PORT": str(port or server.port),
        "OPTIONS": {"pool": pool, **(options or {})},
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": False,
        "AUTOCOMMIT": True,
        "ATOMIC_REQUESTS": False,
        "TIME_ZONE": None,
        "TEST": {},
    }
    return DatabaseWrapper(settings, alias)
