"""Regenerate the option tables of docs/configuration.md and README.md from
django_pooled_pg.options (each option is described once, on its PoolOptions field).

    python docs/gen_options.py          # rewrite both tables in place
    python docs/gen_options.py --check  # exit 1 if either is stale

Each row's failure message is produced by the real validation code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import django
from django.conf import settings

if not settings.configured:
    settings.configure()
    django.setup()

from django_pooled_pg.options import OPTIONS, Option, OptionError, parse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- options:start -->", "<!-- options:end -->"


def failure(o: Option) -> str:
    try:
        parse("default", {o.name: o.bad_example})
    except OptionError as exc:
        return str(exc).replace("|", "\\|")
    raise AssertionError(f"{o.name}={o.bad_example!r} was accepted")


def reference_table() -> str:
    """docs/configuration.md: everything about each option."""
    rows = [
        "| option | default | accepted | meaning | failure message (example) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in OPTIONS:
        rows.append(f"| `{o.name}` | {o.shown_default()} | {o.accepted} | {o.doc} | {failure(o)} |")
    return "\n".join(rows)


def summary_table() -> str:
    """README.md: each option in a line."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for o in OPTIONS:
        rows.append(f"| `{o.name}` | {o.shown_default()} | {o.summary} |")
    return "\n".join(rows)


TABLES = {
    ROOT / "docs" / "configuration.md": reference_table,
    ROOT / "README.md": summary_table,
}


def render(text: str, table: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


if __name__ == "__main__":
    stale = []
    for path, make in TABLES.items():
        current = path.read_text()
        wanted = render(current, make())
        if current != wanted:
            stale.append(path.name)
            if "--check" not in sys.argv:
                path.write_text(wanted)
    if "--check" in sys.argv and stale:
        print(f"stale: {', '.join(stale)}; run docs/gen_options.py", file=sys.stderr)
        sys.exit(1)
