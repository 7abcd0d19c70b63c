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

#: The URL schemes that select django_pooled_pg.
SCHEMES = ("pooled-postgres", "pooled-postgresql")
ENGINE = "django_pooled_pg"


def register() -> None:
    """Teach dj-database-url and django-environ (those installed) the schemes; idempotent."""
    try:
        import dj_database_url
    except ImportError:
        pass
    else:
        # The postgres scheme's own postprocessing (currentSchema -> search_path).
        postgres = dj_database_url.ENGINE_SCHEMES["postgres"].postprocess
        for scheme in SCHEMES:
            dj_database_url.register(scheme, ENGINE)(postgres)
    try:
        import environ
    except ImportError:
        pass
    else:
        for scheme in SCHEMES:
            environ.Env.DB_SCHEMES[scheme] = ENGINE
            # The postgres family: multi-host netlocs, socket paths as HOST.
            if scheme not in environ.Env.POSTGRES_FAMILY:
                environ.Env.POSTGRES_FAMILY.append(scheme)


register()
