"""The private upstream code we depend on is the code we were written against.

``django_pooled_pg.upstream`` lists every private psycopg, psycopg_pool and
Django name the engine uses, with a fingerprint of each function's source per
release. A failure here names the upstream change to review; the procedure is
in docs/contributing.md ("A new upstream release").
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
from pathlib import Path
from typing import Any

import pytest
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg_pool import ConnectionPool

import django_pooled_pg
import django_pooled_pg.base
from django_pooled_pg import upstream
from django_pooled_pg.upstream import (
    ATTRIBUTE,
    COPIED,
    FINGERPRINTS,
    KINDS,
    OVERRIDDEN,
    USES,
    Use,
    check,
    fingerprint,
    normalised_source,
)

PACKAGE = Path(django_pooled_pg.__file__).parent


def _use(name: str) -> Use:
    return next(u for u in USES if u.name == name)


# -- the guard on the installed versions ------------------------------------------


def test_installed_upstream_code_is_the_code_we_were_written_against() -> None:
    problems = check()
    assert not problems, "\n\n".join(
        [f"{len(problems)} upstream change(s) to review (docs/contributing.md):", *problems]
    )


def test_the_table_is_complete_and_consistent() -> None:
    names = [u.name for u in USES]
    assert len(names) == len(set(names)), "a name is listed twice"
    for u in USES:
        assert u.kind in KINDS, u
        assert u.package in upstream.DISTRIBUTIONS, u
        assert u.why and u.used_by, u
    fingerprinted = {u.name for u in USES if u.fingerprinted}
    assert fingerprinted - set(FINGERPRINTS) == set(), "never recorded: run --record"
    assert set(FINGERPRINTS) - fingerprinted == set(), "recorded, no longer listed"


# -- the guard catches what it should, and nothing else ------------------------------


def test_a_changed_function_is_named_with_what_to_do() -> None:
    use = _use("psycopg_pool.ConnectionPool._return_connection")
    problems = check([use], {use.name: {"0123456789ab": ("3.3.0", "3.3.1", "3.3.2", "3.3.3")}})
    assert len(problems) == 1
    problem = problems[0]
    version = upstream.installed_version("psycopg_pool")
    assert problem.startswith(f"psycopg-pool {version} changed ConnectionPool._return_connection")
    assert fingerprint(ConnectionPool._return_connection) in problem
    assert "0123456789ab in 3.3.0-3.3.3 (4 releases)" in problem
    assert "DjangoPool._return_connection" in problem  # our code to adapt
    assert "--record" in problem


def test_a_function_edited_in_place_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def _putconn(self: Any, conn: Any, from_getconn: bool) -> None:
        self._return_connection(conn, from_getconn=not from_getconn)  # a changed upstream

    monkeypatch.setattr(ConnectionPool, "_putconn", _putconn)
    problems = check([_use("psycopg_pool.ConnectionPool._putconn")])
    assert len(problems) == 1 and "changed ConnectionPool._putconn" in problems[0]


@pytest.mark.parametrize(
    ("name", "kind", "said"),
    [
        ("psycopg_pool.ConnectionPool._no_such_hook", OVERRIDDEN, "ConnectionPool._no_such_hook"),
        ("psycopg_pool.ConnectionPool._no_such_attribute", ATTRIBUTE, "_no_such_attribute"),
        ("psycopg_pool.no_such_module.Thing", COPIED, "no_such_module"),
        ("psycopg.Connection._no_such_stamp", ATTRIBUTE, "_no_such_stamp"),
    ],
)
def test_a_missing_name_is_named(name: str, kind: str, said: str) -> None:
    problems = check([Use(name, kind, "why", "Ours.method")], {name: {"x": ("1",)}})
    assert len(problems) == 1
    assert " no longer has " in problems[0] and said in problems[0]
    assert "Ours.method" in problems[0]


def test_a_release_that_leaves_the_guarded_code_alone_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fingerprints are looked up by hash: an unrecorded version is fine."""
    monkeypatch.setattr(upstream, "installed_version", lambda package: "99.0.1")
    assert check() == []


def test_an_unrecorded_entry_asks_for_recording() -> None:
    use = _use("psycopg_pool.ConnectionPool._putconn")
    [problem] = check([use], {})
    assert "No fingerprint recorded" in problem and "--record" in problem


def test_fingerprints_ignore_comments_docstrings_and_layout() -> None:
    a = '''
        def f(self, x):
            """Doc."""
            # a comment
            return x + 1  # trailing
    '''
    b = "def f(self,  x):\n\n        return x + 1\n"
    c = "def f(self, x):\n    return x + 2\n"
    assert normalised_source(textwrap.dedent(a)) == normalised_source(b)
    assert normalised_source(b) != normalised_source(c)
    assert normalised_source('def f():\n    return "é"  # é\n') == 'def f(): return "é"'


def test_recording_moves_a_version_to_its_new_fingerprint() -> None:
    use = _use("psycopg_pool.ConnectionPool._putconn")
    findings = [upstream.Finding(use, "3.3.4", "bbbbbbbbbbbb", None)]
    table = {use.name: {"aaaaaaaaaaaa": ("3.3.0", "3.3.4"), "cccccccccccc": ("3.3.4",)}}
    merged = upstream.merged(findings, table)
    assert merged == {use.name: {"aaaaaaaaaaaa": ("3.3.0",), "bbbbbbbbbbbb": ("3.3.4",)}}
    rendered = upstream.render(merged)
    namespace: dict[str, Any] = {}
    exec(rendered, namespace)
    assert namespace["FINGERPRINTS"] == merged


# -- the list covers what the package does -----------------------------------------

#: Upstream classes our package subclasses (looked up when the test runs: a
#: class an upstream release removed is the guard's to report).
SUBCLASSED = (
    "psycopg_pool.ConnectionPool",
    "psycopg_pool.pool.MaintenanceTask",
    "psycopg_pool.base.AttemptWithBackoff",
    "psycopg.Connection",
    "django.db.backends.postgresql.base.DatabaseWrapper",
    "django.db.backends.postgresql.creation.DatabaseCreation",
    "django.db.utils.DatabaseErrorWrapper",
)


def _our_subclasses(base: type) -> list[type]:
    found, todo = [], [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("django_pooled_pg."):
                found.append(sub)
            todo.append(sub)
    return found


def test_every_private_override_is_listed_and_every_listed_override_exists() -> None:
    assert django_pooled_pg.base  # imports every module the ENGINE uses
    listed = set()
    for u in USES:
        if u.kind in (OVERRIDDEN, COPIED):
            owner, _, member = u.name.rpartition(".")
            with contextlib.suppress(upstream.Missing):  # the guard test names it
                listed.add((upstream.resolve(owner), member))
    overrides = set()
    for base_name in SUBCLASSED:
        try:
            base = upstream.resolve(base_name)
        except upstream.Missing:
            continue
        for ours in _our_subclasses(base):
            for name in vars(ours):
                if name == "_abc_impl":  # ABCMeta's, on every subclass
                    continue
                if hasattr(base, name) and (not name.startswith("__") or name == "__exit__"):
                    overrides.add((base, name))
    unlisted = sorted(
        f"{base.__module__}.{base.__qualname__}.{name}"
        for base, name in overrides
        if name.startswith("_")
        and not any(owner in base.__mro__ and n == name for owner, n in listed)
    )
    assert not unlisted, f"private upstream methods we override, missing from USES: {unlisted}"
    unused = sorted(
        f"{owner.__qualname__}.{name}"
        for owner, name in listed
        if not any(owner in base.__mro__ and n == name for base, n in overrides)
    )
    assert not unused, f"listed as overridden or copied, but nothing of ours overrides: {unused}"


def _private_names_used_and_defined() -> tuple[dict[str, set[str]], set[str]]:
    used: dict[str, set[str]] = {}
    defined: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "upstream.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = str(path.relative_to(PACKAGE))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
                body = node.body
                if isinstance(node, ast.ClassDef):  # class attributes
                    for stmt in body:
                        targets = stmt.targets if isinstance(stmt, ast.Assign) else []
                        if isinstance(stmt, ast.AnnAssign):
                            targets = [stmt.target]
                        defined.update(t.id for t in targets if isinstance(t, ast.Name))
                elif node.name == "__init__":  # instance attributes we create
                    for sub in ast.walk(node):
                        target = None
                        if isinstance(sub, ast.Assign) and len(sub.targets) == 1:
                            target = sub.targets[0]
                        elif isinstance(sub, ast.AnnAssign):
                            target = sub.target
                        if (
                            isinstance(target, ast.Attribute)
                            and isinstance(target.value, ast.Name)
                            and target.value.id == "self"
                        ):
                            defined.add(target.attr)
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                used.setdefault(node.attr, set()).add(where)
    return used, defined


def test_every_private_upstream_name_the_package_touches_is_listed() -> None:
    """A ``x._name`` in the package is ours (defined here) or listed in USES."""
    used, defined = _private_names_used_and_defined()
    listed = {u.name.rpartition(".")[2] for u in USES}
    unlisted = {
        name: sorted(files)
        for name, files in sorted(used.items())
        if name not in defined and name not in listed and not name.startswith("_dpp_")
    }
    assert not unlisted, (
        f"private names of psycopg, psycopg_pool or Django used but not in "
        f"django_pooled_pg/upstream.py's USES: {unlisted}"
    )


# -- the copied connect() --------------------------------------------------------


def _connect_parts(func: Any) -> tuple[set[str], set[str]]:
    """Attributes a connect() assigns on self, and names of what it calls."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    assigned, called = set(), set()
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            if (
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
            ):
                assigned.add(t.attr)
        if isinstance(node, ast.Call):
            f = node.func
            called.add(f.attr if isinstance(f, ast.Attribute) else ast.unparse(f))
    return assigned, called


def test_our_connect_sets_and_calls_everything_djangos_does() -> None:
    """A field or a step a new Django adds to connect() fails here by name.

    test_checkout.test_checkout_leaves_the_wrapper_as_djangos_connect_does
    compares the two at run time, on every attribute of the wrapper.
    """
    theirs_set, theirs_called = _connect_parts(BaseDatabaseWrapper.connect)
    ours_set, ours_called = _connect_parts(django_pooled_pg.base.DatabaseWrapper.connect)
    assert theirs_set - ours_set == set(), "Django's connect() sets these; ours does not"
    assert theirs_called - ours_called == set(), "Django's connect() calls these; ours does not"
    assert "connect" in {u.name.rpartition(".")[2] for u in USES if u.kind == COPIED}
