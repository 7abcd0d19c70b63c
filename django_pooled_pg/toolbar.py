"""A django-debug-toolbar panel: the current request's checkouts and the pools around it.

Add ``"django_pooled_pg.toolbar.PoolPanel"`` to ``DEBUG_TOOLBAR_PANELS``.
For the request it shows each checkout (alias, holder, wait, hold, whether
the session reset was sent or skipped, whether the connection was new or
reused, its server process) and each pool's state at the start and the end
of the request.

Django returns a request's connection when the response is closed
(``request_finished``), after the toolbar has recorded its panels: the panel
records again as each connection comes back, so the hold and reset are
there when the panel is opened (with the toolbar's default store, and any
store whose ``save_panel`` needs no database connection of ours).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any

from debug_toolbar.panels import Panel
from django.utils.html import format_html, format_html_join

from . import registry, trace


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "still out"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms"


def _states() -> dict[str, dict[str, Any]]:
    return {p.alias: asdict(p.live_state()) for p in registry.find() if not p.closed}


class PoolPanel(Panel):  # type: ignore[misc]
    """The current request's checkouts from the pools, and the pools around it."""

    title = "Connection pools"
    is_async = True  # the trace is a context variable: it follows the request

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trace: trace.Trace | None = None
        self._before: dict[str, dict[str, Any]] = {}
        self._after: dict[str, dict[str, Any]] | None = None

    @property
    def nav_subtitle(self) -> str:
        checkouts = self.get_stats().get("checkouts", [])
        n = len(checkouts)
        waited = sum(c["waited"] for c in checkouts)
        return f"{n} checkout{'s' if n != 1 else ''}, waited {_fmt(waited)}"

    def process_request(self, request: Any) -> Any:
        self._before = _states()
        self._trace, token = trace.start(on_return=self._record)
        try:
            response = super().process_request(request)
        except BaseException:
            trace.stop(token)
            raise
        if inspect.isawaitable(response):
            return self._finish(response, token)
        trace.stop(token)
        return response

    async def _finish(self, response: Awaitable[Any], token: Any) -> Any:
        try:
            return await response
        finally:
            trace.stop(token)

    def generate_stats(self, request: Any, response: Any) -> None:
        self._after = _states()
        self._record()

    def _record(self) -> None:
        # Also called by the pool as each traced connection comes back.
        if self._after is None or self._trace is None:
            return  # returned during the request: generate_stats records it
        self.record_stats(
            {
                "checkouts": [e.to_dict() for e in self._trace.entries],
                "before": self._before,
                "after": self._after,
            }
        )

    @property
    def content(self) -> str:
        stats = self.get_stats()
        checkouts = stats.get("checkouts", [])
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td></tr>",
            (
                (
                    c["alias"],
                    c["holder"] or "(holders off)",
                    _fmt(c["waited"]),
                    _fmt(c["held"]),
                    c["reset"] or "pending",
                    "new" if c["new"] else "reused",
                    c["backend_pid"],
                )
                for c in checkouts
            ),
        )
        table = format_html(
            "<table><thead><tr><th>Alias</th><th>Holder</th><th>Wait</th><th>Held</th>"
            "<th>Session reset</th><th>Connection</th><th>Server pid</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )
        before, after = stats.get("before", {}), stats.get("after", {})
        pools = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td></tr>",
            (
                (
                    alias,
                    state,
                    s["size"],
                    s["idle"],
                    s["in_use"],
                    s["waiting"],
                    "open" if s["open"] else "closed",
                )
                for alias in sorted(set(before) | set(after))
                for state, s in (("start", before.get(alias)), ("end", after.get(alias)))
                if s is not None
            ),
        )
        states = format_html(
            "<h4>Pools at the start and the end of the request</h4>"
            "<table><thead><tr><th>Alias</th><th>When</th><th>Size</th><th>Idle</th>"
            "<th>In use</th><th>Waiting</th><th>Pool</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            pools,
        )
        return format_html("{}{}", table, states)
