"""``manage.py poolstats``: what every process's pools are doing, and the server's view."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from django_pooled_pg.base import DatabaseWrapper
from django_pooled_pg.observability.api import pooled_aliases
from django_pooled_pg.observability.report import (
    FORMATS,
    HOLDER_SORTS,
    Report,
    build_report,
    render_holders_json,
    render_holders_table,
    render_json,
    render_table,
)
from django_pooled_pg.observability.sizing import (
    advise_report,
    render_advice_json,
    render_advice_table,
)


def render_prometheus(report: Report) -> str:
    try:
        from django_pooled_pg.observability.prometheus import render_prometheus
    except ImportError:
        raise CommandError(
            "--format prometheus needs prometheus_client: pip install 'django-pooled-pg[prometheus]'."
        ) from None
    return render_prometheus(report)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise CommandError(f"--watch is {value!r}; it must be a number of seconds > 0.")
    return seconds


class Command(BaseCommand):
    help = (
        "Show the connection pools of every process of this deployment (through the "
        "stats cache), totals, and the server's view from pg_stat_activity."
    )
    requires_system_checks: list[str] = []  # works on a broken deployment too

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database",
            metavar="ALIAS",
            help="Only this alias (default: every alias that uses django_pooled_pg).",
        )
        parser.add_argument(
            "--format",
            dest="output_format",
            default=None,
            help=f"Output format: {', '.join(FORMATS)} (default: table).",
        )
        parser.add_argument("--json", action="store_true", help="The same as --format json.")
        parser.add_argument(
            "--watch",
            metavar="SECONDS",
            help="Refresh every SECONDS, with per-second rates, until Ctrl-C.",
        )
        parser.add_argument(
            "--local",
            action="store_true",
            help="Only this process: do not read other processes' stats.",
        )
        parser.add_argument(
            "--no-server",
            action="store_true",
            help="Do not query pg_stat_activity.",
        )
        parser.add_argument(
            "--holders",
            action="store_true",
            help="Who holds the connections: views, tasks, commands or callers, every "
            "process together (pool option holders).",
        )
        parser.add_argument(
            "--advise",
            action="store_true",
            help="Recommend max_size per process from the recorded hold and wait times "
            "and checkout rates (Little's law), against the server's max_connections "
            "(or PgBouncer's max_client_conn), with the reasoning.",
        )
        parser.add_argument(
            "--sort",
            default="hold",
            help=f"With --holders: order by {', '.join(HOLDER_SORTS)} (default: hold, "
            "the total time held).",
        )
        parser.add_argument(
            "--top",
            default="20",
            metavar="N",
            help="With --holders: the N first holders; the rest are summed as (other) "
            "(default: 20).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        fmt = options["output_format"]
        if options["json"]:
            if fmt not in (None, "json"):
                raise CommandError(f"--json and --format {fmt} contradict each other.")
            fmt = "json"
        fmt = fmt or "table"
        if fmt not in FORMATS:
            raise CommandError(f"--format is {fmt!r}; it must be one of: {', '.join(FORMATS)}.")
        watch = _seconds(options["watch"]) if options["watch"] is not None else None
        self.holders = options["holders"]
        self.sort = options["sort"]
        if self.sort not in HOLDER_SORTS:
            raise CommandError(
                f"--sort is {self.sort!r}; it must be one of: {', '.join(HOLDER_SORTS)}."
            )
        try:
            self.top = int(options["top"])
        except ValueError:
            self.top = 0
        if self.top < 1:
            raise CommandError(f"--top is {options['top']!r}; it must be an integer >= 1.")
        if not self.holders and (self.sort != "hold" or options["top"] != "20"):
            raise CommandError("--sort and --top go with --holders.")
        self.advise = options["advise"]
        if self.advise and self.holders:
            raise CommandError("--advise and --holders are two reports: give one.")
        if self.advise and (fmt == "prometheus" or watch is not None):
            raise CommandError("--advise works with --format table or json, without --watch.")
        if watch is not None and fmt == "prometheus":
            raise CommandError("--watch works with --format table or json, not prometheus.")
        aliases = self._aliases(options["database"])

        def build() -> Report:
            return build_report(
                aliases,
                deployment=not options["local"],
                server=not (options["no_server"] or self.holders),
                pooler=not self.holders,
            )

        if watch is None:
            self._emit(fmt, build(), None, None)
            return
        previous: Report | None = None
        tty = sys.stdout.isatty()
        try:
            while True:
                report = build()
                if tty and fmt == "table":
                    self.stdout.write("\x1b[H\x1b[2J", ending="")  # clear, top left
                self._emit(fmt, report, previous, watch)
                previous = report
                time.sleep(watch)
        except KeyboardInterrupt:
            self.stdout.write("")
            return

    def _emit(self, fmt: str, report: Report, previous: Report | None, watch: float | None) -> None:
        if self.advise:
            advice = advise_report(report)
            text = (
                json.dumps(render_advice_json(advice), indent=2)
                if fmt == "json"
                else render_advice_table(advice)
            )
        elif self.holders and fmt == "json":
            text = json.dumps(
                render_holders_json(report, self.sort, self.top), indent=None if watch else 2
            )
        elif self.holders and fmt == "table":
            text = render_holders_table(report, self.sort, self.top)
        elif fmt == "json":
            text = json.dumps(render_json(report, previous), indent=None if watch else 2)
        elif fmt == "prometheus":
            text = render_prometheus(report)
        else:
            text = render_table(report, previous, color=self.style)
        self.stdout.write(text, ending="" if text.endswith("\n") else "\n")
        self.stdout.flush()

    def _aliases(self, wanted: str | None) -> list[str]:
        configured = list(connections)
        if wanted is not None:
            if wanted not in configured:
                raise CommandError(
                    f"--database {wanted!r}: no such alias. Configured aliases: "
                    f"{', '.join(configured)}."
                )
            wrapper = connections[wanted]
            if not isinstance(wrapper, DatabaseWrapper):
                raise CommandError(
                    f"--database {wanted!r} uses ENGINE "
                    f"{wrapper.settings_dict['ENGINE']!r}, not django_pooled_pg: it has no pool."
                )
            if not wrapper.pooled:
                raise CommandError(
                    f"--database {wanted!r} uses django_pooled_pg with pooling off "
                    "(OPTIONS['pool'] is False): it has no pool."
                )
            return [wanted]
        found = pooled_aliases()
        if not found:
            raise CommandError(
                "No database alias uses django_pooled_pg with pooling on. Configured "
                f"aliases: {', '.join(configured)}."
            )
        return found
