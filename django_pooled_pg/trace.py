"""Every checkout of one request, for the Debug Toolbar panel (``toolbar.py``).

A ``Trace`` is set in a context variable for the length of a request the
panel watches; the pool asks for it at each checkout once a trace was ever
started in the process (until then it reads a module flag only) and hands
the checkout's ``Entry`` to the connection, which fills in its hold and
reset when it comes back, after the response.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import asdict, dataclass, field
from time import monotonic
from typing import Any


@dataclass
class Entry:
    """One checkout: the pool option values are in poolstats, not here."""

    alias: str
    holder: str | None
    waited: float  # seconds from asking to holding
    new: bool  # the connection's first checkout (opened for this pool meanwhile)
    backend_pid: int
    at: float  # monotonic time of the checkout
    held: float | None = None  # None: still out
    reset: str | None = None  # "sent", "skipped", "none" (reset_session=False), "discarded"
    #: The holder's cell (holders.Holder): a request's is named once its view
    #: is known, after an early checkout; read when the entry is shown.
    cell: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        cell = data.pop("cell")
        if cell is not None:
            data["holder"] = cell.name
        return data


@dataclass
class Trace:
    """The checkouts of one request, in order."""

    entries: list[Entry] = field(default_factory=list)
    started: float = field(default_factory=monotonic)
    #: Called (without arguments) each time an entry's connection came back.
    on_return: Callable[[], None] | None = None


_current: ContextVar[Trace | None] = ContextVar("django_pooled_pg_trace", default=None)

#: Whether a trace was ever started in this process: until then (always, in
#: production) a checkout does not even read the context variable.
ever_started = False


def current() -> Trace | None:
    return _current.get()


def start(on_return: Callable[[], None] | None = None) -> tuple[Trace, Token[Trace | None]]:
    global ever_started
    ever_started = True
    trace = Trace(on_return=on_return)
    return trace, _current.set(trace)


def stop(token: Token[Trace | None]) -> None:
    _current.reset(token)
