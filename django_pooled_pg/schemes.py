"""``DATABASE_URL`` schemes that select this engine, for dj-database-url and django-environ.

In settings, before the URL is parsed::

    import django_pooled_pg.schemes  # noqa: F401  (registers the schemes)

    DATABASES = {"default": dj_database_url.config()}   # or env.db()

and ``DATABASE_URL=pooled-postgres://user:password@host:5432/app?pool_max_size=8``.
Both libraries put the URL's query parameters into ``OPTIONS`` as flat keys;
``pool_<option>`` keys are pool options (``options.py``). Whichever library
is installed is taught the schemes; neither is needed. Without this import,
pass ``engine="django_pooled_pg"`` to ``dj_database_url.config()``/``parse()``
or ``env.db(engine="django_pooled_pg")`` with a ``postgres://`` URL.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The URL schemes that select django_pooled_pg.
SCHEMES = ("pooled-postgres", "pooled-postgresql")
ENGINE = "django_pooled_pg"


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def register() -> None:
    """Teach dj-database-url and django-environ (those installed) the schemes; idempotent."""
    dj_database_url: Any = _optional("dj_database_url")
    # dj-database-url 1.0+ (register() and ENGINE_SCHEMES); older releases
    # have neither, and a module of that name from another package neither.
    register_scheme = getattr(dj_database_url, "register", None)
    known = getattr(dj_database_url, "ENGINE_SCHEMES", None)
    if callable(register_scheme) and isinstance(known, dict) and "postgres" in known:
        # The postgres scheme's own postprocessing (currentSchema -> search_path).
        postgres = known["postgres"].postprocess
        for scheme in SCHEMES:
            register_scheme(scheme, ENGINE)(postgres)
    environ: Any = _optional("environ")
    # django-environ's Env; the environ-config package has a module of the same name.
    env = getattr(environ, "Env", None)
    schemes = getattr(env, "DB_SCHEMES", None)
    family = getattr(env, "POSTGRES_FAMILY", None)
    if isinstance(schemes, dict) and isinstance(family, list):
        for scheme in SCHEMES:
            schemes[scheme] = ENGINE
            # The postgres family: multi-host netlocs, socket paths as HOST.
            if scheme not in family:
                family.append(scheme)


register()
