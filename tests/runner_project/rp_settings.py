"""A small project for running real test runners on the pooled engine.

The server comes from DATABASE_URL or the PG* variables; ``RP_DB`` names the database, so
each runner under test gets test databases of its own. Two aliases point at
the same database (``default`` and ``twin``, which MIRRORs default in tests),
and ``other`` at a second one.
"""

import os

from dpp_devtools import throwaway

_name = os.environ.get("RP_DB", "rp")
_server = {k: v for k, v in throwaway.database_settings(_name).items() if k != "NAME"}

SECRET_KEY = "runner-project-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "rp_urls"
USE_TZ = True
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.staticfiles",
    "rp_app",
]
DATABASES = {
    "default": {
        "ENGINE": "django_pooled_pg",
        "NAME": _name,
        **_server,
        "OPTIONS": {"pool": {"max_size": 4}},
    },
    "twin": {
        "ENGINE": "django_pooled_pg",
        "NAME": _name,
        **_server,
        "OPTIONS": {"pool": {"max_size": 2}},
        "TEST": {"MIRROR": "default"},
    },
    "other": {
        "ENGINE": "django_pooled_pg",
        "NAME": f"{_name}_other",
        **_server,
        "OPTIONS": {"pool": {"max_size": 2}},
    },
}
