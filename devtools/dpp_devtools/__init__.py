"""Development tools of django-pooled-pg, shared by the tests, bench/, the test project and CI.

* ``throwaway``: a throwaway PostgreSQL cluster (password authentication over
  TCP, dropped privileges as root, immediate stops), started when the test
  project's settings load and no server is configured;
* ``proxy``: a TCP proxy that forwards, goes silent or slows connection set-up;
* ``servers``: start the test project under a real server (gunicorn,
  uvicorn), wait until it serves, stop it;
* ``strategies``: the connection strategies the benchmarks compare.

Not part of the django-pooled-pg distribution: ``dev.py`` and tox install it
from ``devtools/`` (editable) next to the project.
"""
