"""What the pools are doing, for people and for monitoring.

Layered, each module importing only those listed before it (import-linter
contracts in pyproject.toml keep it so):

* ``records``: per-alias counters, distributions and snapshots (a leaf);
* ``activity``: how our sessions are named, and pg_stat_activity read back;
* ``api``: ``django_pooled_pg.stats()``, from the registry's pools;
* ``publisher``: every process's stats through a shared Django cache;
* ``report``: poolstats' report, merged across processes, as a table or JSON;
* ``prometheus``: the Prometheus collector, text and view.
"""
