"""Regenerate the option table of docs/configuration.md from django_pooled_pg.options.

    python docs/gen_options.py          # rewrite the table in place
    python docs/gen_options.py --check  # exit 1 if the docs are stale

Each row's failure message is produced by the real validation code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django
from django.conf import settings

if not settings.configured:
    settings.configure()
    django.setup()

from django_pooled_pg.options import OPTIONS, OptionError, parse  # noqa: E402

DOC = Path(__file__).resolve().parent / "configuration.md"
START, END = "<!-- options:start -->", "<!-- options:end -->"

BAD_VALUES: dict[str, Any] = {
    "min_size": -1,
    "max_size": 0,
    "timeout": -1,
    "max_waiting": -1,
    "max_lifetime": 0,
    "max_idle": 0,
    "reconnect_timeout": 0,
    "num_workers": 0,
    "name": "",
    "check": "myapp.nowhere.check",
    "configure": 42,
    "reset": 42,
    "reset_session": "yes",
    "password_provider": "myapp.nowhere.token",
    "fail_fast": "yes",
    "stats": "on",
    "leak_timeout": 0,
    "log_waits_over": -1,
}


def default(name: str, value: Any) -> str:
    if name == "min_size":
        return "`1` (at most `max_size`)"
    if name == "name":
        return "the alias"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"`{value:g}` s"
    return f"`{value!r}`"


def failure(name: str) -> str:
    try:
        parse("default", {name: BAD_VALUES[name]})
    except OptionError as exc:
        return str(exc).replace("|", "\\|")
    raise AssertionError(f"{name}={BAD_VALUES[name]!r} was accepted")


def table() -> str:
    rows = [
        "| option | default | accepted | meaning | failure message (example) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in OPTIONS:
        rows.append(
            f"| `{o.name}` | {default(o.name, o.default)} | {o.accepted} | {o.doc} | {failure(o.name)} |"
        )
    return "\n".join(rows)


def render(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    current = DOC.read_text()
    wanted = render(current)
    if "--check" in sys.argv:
        sys.exit(0 if current == wanted else 1)
    DOC.write_text(wanted)
