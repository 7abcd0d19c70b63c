"""Settings for Django's own test suite, on our engine or Django's.

``DJANGOSUITE_ENGINE`` picks the ENGINE (``django_pooled_pg`` or
``django.db.backends.postgresql``); the server comes from the ``PG*``
variables that ``run.py`` exports. Both of Django's aliases get a pool with
the engine's defaults, as a user who switches ENGINE would have.
"""

import os

ENGINE = os.environ.get("DJANGOSUITE_ENGINE", "django_pooled_pg")
_server = {
    "HOST": os.environ["PGHOST"],
    "PORT": os.environ["PGPORT"],
    "USER": os.environ["PGUSER"],
    "PASSWORD": os.environ["PGPASSWORD"],
}
_options = {"pool": True} if ENGINE == "django_pooled_pg" else {}

DATABASES = {
    "default": {
        "ENGINE": ENGINE,
        "NAME": "djangosuite_default",
        **_server,
        "OPTIONS": dict(_options),
    },
    "other": {"ENGINE": ENGINE, "NAME": "djangosuite_other", **_server, "OPTIONS": dict(_options)},
}

SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
USE_TZ = False
TEST_RUNNER = "djangosuite_runner.RecordingRunner"
