"""Settings of the test project: the pooled engine on a real PostgreSQL.

The server comes from DATABASE_URL or the PG* variables; with neither, a
throwaway cluster is started for this process (see dpp_devtools.throwaway).
"""

import json
import os

from dpp_devtools import strategies, throwaway

SECRET_KEY = "testproject-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "testproject.urls"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "demoapp",
    "django_pooled_pg",
]
# Charges each request's checkouts to its view (poolstats --holders).
MIDDLEWARE: list[str] = ["django_pooled_pg.middleware.HolderMiddleware"]

try:
    _db = throwaway.database_settings()
except throwaway.NoPostgreSQL as exc:
    # The first thing a new user runs (dev.py demo, dev.py test) ends here
    # when no server can be had: what to do, without a traceback.
    raise SystemExit(str(exc)) from None
DATABASES = {
    "default": {
        "ENGINE": "django_pooled_pg",
        **_db,
        "OPTIONS": {
            "pool": {
                "max_size": int(os.environ.get("POOL_MAX_SIZE", "4")),
                # Extra pool options, for tests that run manage.py in a subprocess.
                **json.loads(os.environ.get("POOL_OPTIONS_JSON", "{}")),
            }
        },
    },
    # The same database through a pool of two, for tests that exhaust or
    # starve a pool on purpose.
    "small": {
        "ENGINE": "django_pooled_pg",
        **_db,
        "OPTIONS": {"pool": {"min_size": 0, "max_size": 2, "timeout": 2}},
        "TEST": {"MIRROR": "default"},
    },
}

# A shared stats cache and a metrics token, for tests that run several
# processes (tests/test_deployment.py); without these variables the defaults
# stand: a local-memory cache (nothing published) and no token.
if _stats_dir := os.environ.get("DPP_STATS_CACHE_DIR"):
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "stats": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": _stats_dir,
        },
    }
    POOLED_PG_STATS = {
        "CACHE": "stats",
        "INTERVAL": float(os.environ.get("DPP_STATS_INTERVAL", "5")),
    }
if _metrics_token := os.environ.get("DPP_METRICS_TOKEN"):
    POOLED_PG_METRICS_TOKEN = _metrics_token

# The benchmark suite's end-to-end scenario serves this project with each
# strategy it compares (bench/e2e.py): TESTPROJECT_DB_STRATEGY names one of
# dpp_devtools.strategies.STRATEGIES ("persistent", "django pool", ...).
if _strategy := os.environ.get("TESTPROJECT_DB_STRATEGY"):
    DATABASES["default"] = strategies.database(
        _strategy,
        _db,
        min_size=1,
        max_size=int(os.environ.get("POOL_MAX_SIZE", "4")),
        pool=json.loads(os.environ.get("POOL_OPTIONS_JSON", "{}")),
    )

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_pooled_pg": {"handlers": ["console"], "level": "WARNING"}},
}
