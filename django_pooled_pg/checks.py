"""System checks: pool options are validated by a plain ``manage.py check``.

Registered when the backend is loaded, which Django does at startup for the
default alias as soon as any model class is defined; ``check --database``
loads every alias's backend.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from .errors import PERSISTENT_CONNECTIONS_MESSAGE
from .options import collect_errors, libpq_errors, pool_switch

ENGINE = "django_pooled_pg"


def check_pool_options(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Report each bad pool option of every alias that uses this engine."""
    messages: list[checks.CheckMessage] = []
    for alias, db in getattr(settings, "DATABASES", {}).items():
        if db.get("ENGINE") != ENGINE:
            continue
        options = db.get("OPTIONS") or {}
        raw = pool_switch(options.get("pool", True))
        errors = (
            libpq_errors(alias, options) if raw is False else collect_errors(alias, raw, options)
        )
        for error in errors:
            messages.append(
                checks.Error(str(error), obj=f"DATABASES[{alias!r}]", id="django_pooled_pg.E001")
            )
        if raw is not False and db.get("CONN_MAX_AGE", 0) != 0:  # pooling off: Django's own
            messages.append(
                checks.Error(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is {db['CONN_MAX_AGE']!r}. "
                    + PERSISTENT_CONNECTIONS_MESSAGE,
                    obj=f"DATABASES[{alias!r}]",
                    id="django_pooled_pg.E002",
                )
            )
    return messages
