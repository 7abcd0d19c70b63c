"""Who holds a connection: the view, task or command behind each checkout.

The pool asks ``holder()`` at every checkout (pool option ``holders``). The
answer comes, cheapest first, from:

* a context variable that knows what the code is running for: the resolved
  view of a request (``middleware.HolderMiddleware``), the Celery task being
  run (the app connects Celery's task signals in a worker), the management
  command this process runs (read from ``sys.argv`` when the app loads);
* else, with ``holders="stack"``, the first frame of the calling stack
  outside Django, psycopg, asgiref and this package (``module.function``): a
  walk of a few dozen frames, microseconds per checkout, several percent of
  a minimal request (``bench/suite.py --scenarios holders``), hence not the
  default, which charges such checkouts to ``UNKNOWN``.

The variable holds a ``Holder`` *cell*, not a name: a request opens its cell
before the URL is resolved and names it in ``process_view``, so a connection
checked out by an earlier middleware is still charged to the view that ran.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

#: What a checkout is charged to when nothing names its holder and the
#: stack walk is off (the default, ``holders=True``) or finds no frame of the user's.
UNKNOWN = "(unknown)"

#: Packages a stack walk passes over: the ORM and everything between it and
#: the socket (instrumentation that wraps Django's connect or cursors too),
#: and the machinery that calls the user's code.
_SKIPPED_PACKAGES = frozenset(
    {
        "django", "django_pooled_pg", "psycopg", "psycopg_pool", "asgiref",
        "concurrent", "threading", "contextlib", "functools", "asyncio",
        "celery", "kombu", "billiard", "gunicorn", "uvicorn", "daphne", "channels",
        "debug_toolbar", "sentry_sdk", "opentelemetry", "ddtrace", "newrelic",
        "elasticapm", "scout_apm", "silk",
    }
)  # fmt: skip

#: Management commands that serve (requests, tasks, messages): their work
#: would all be charged to the command's name; the stack walk tells better.
SERVER_COMMANDS = frozenset(
    {"runserver", "runworker", "rqworker", "qcluster", "run_huey", "celery", "testserver"}
)


class Holder:
    """A named holder; a request's cell is renamed once its view is known."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Holder {self.name!r}>"


_current: ContextVar[Holder | None] = ContextVar("django_pooled_pg_holder", default=None)

#: Every checkout nobody names (never renamed: only cells made by enter() are).
_UNKNOWN_CELL = Holder(UNKNOWN)


def current() -> Holder | None:
    """The holder the running code is known to work for, if any."""
    return _current.get()


def enter(name: str) -> Token[Holder | None]:
    """Charge this context's checkouts to *name* until ``leave(token)``."""
    return _current.set(Holder(name))


def leave(token: Token[Holder | None]) -> None:
    _current.reset(token)


@contextmanager
def holding(name: str) -> Iterator[Holder]:
    """``with holding("nightly-export"):`` charges the block's checkouts to that name."""
    token = enter(name)
    try:
        cell = _current.get()
        assert cell is not None
        yield cell
    finally:
        leave(token)


def from_stack() -> str:
    """``module.function`` of the first caller outside the skipped packages."""
    frame = inspect.currentframe()
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.partition(".")[0] not in _SKIPPED_PACKAGES:
            return f"{module}.{frame.f_code.co_qualname}"
        frame = frame.f_back  # type: ignore[assignment]
    return UNKNOWN


def holder(walk_stack: bool) -> Holder:
    """The holder of a checkout made now (the pool calls this)."""
    cell = _current.get()
    if cell is not None:
        return cell
    return Holder(from_stack()) if walk_stack else _UNKNOWN_CELL


def view_name(func: object) -> str:
    """``module.qualname`` of a resolved view (its class for a class-based view)."""
    target = getattr(func, "view_class", None) or func
    module = getattr(target, "__module__", None) or "?"
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}"


def command_from_argv(argv: list[str]) -> str | None:
    """``command migrate`` when *argv* runs a Django management command, else None."""
    if len(argv) < 2:
        return None
    program = os.path.basename(argv[0])
    if program in ("manage.py", "django-admin", "django-admin.py") or argv[0].endswith(
        os.path.join("django", "__main__.py")
    ):
        sub = argv[1]
        if sub and not sub.startswith("-") and sub not in SERVER_COMMANDS:
            return f"command {sub}"
    return None


def task_started(task: object) -> Token[Holder | None]:
    """Celery's ``task_prerun``: charge the task's checkouts to ``task <name>``."""
    return enter(f"task {getattr(task, 'name', None) or type(task).__qualname__}")
