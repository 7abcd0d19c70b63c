"""What the fault scripts share: Django set up bare, a private server, a pooled wrapper."""

from __future__ import annotations

from typing import Any

from dpp_devtools import throwaway


def setup_django() -> None:
    from django.conf import settings

    settings.configure(USE_TZ=True, TIME_ZONE="UTC", INSTALLED_APPS=[])
    import django

    django.setup()


def private_server() -> throwaway.ThrowawayServer:
    """A throwaway cluster with a database ``private``; call destroy() after."""
    return throwaway.start_private("private")


def pooled_wrapper(
    server: throwaway.ThrowawayServer,
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
