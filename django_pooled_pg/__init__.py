"""django-pooled-pg: Django's PostgreSQL backend with a process-wide psycopg pool.

Use it with ``DATABASES = {"default": {"ENGINE": "django_pooled_pg", ...}}``.
"""

from .errors import PoolExhausted, ServerUnavailable
from .observability.api import stats
from .observability.records import PoolStats
from .registry import unavailable

__all__ = ["PoolExhausted", "PoolStats", "ServerUnavailable", "stats", "unavailable"]
__version__ = "0.1.0"
