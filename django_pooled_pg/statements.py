"""Whether SQL may change session state: the classifier for ``reset_session="auto"``.

A request that only reads and writes rows leaves the session as it found
it; one that ran ``SET``, created a temporary table, took a session advisory
lock, listened, prepared, or called code we cannot see into may not. The
classifier is conservative: a statement is clean only when it is recognised
as such; anything it does not know marks the session for a reset.

Clean:

* ``SELECT``, ``INSERT``, ``UPDATE``, ``DELETE``, ``MERGE``, ``WITH``,
  ``VALUES``, ``TABLE`` and ``EXPLAIN`` of those, without ``SELECT ...
  INTO``, calling only functions known to leave the session alone
  (``SAFE_FUNCTIONS``), built-in operators (``SAFE_OPERATORS``) and casts
  to built-in types (``SAFE_TYPES``);
* what Django sends inside requests and whose effect ends with the statement
  or the transaction: ``BEGIN``/``START TRANSACTION``, ``COMMIT``/``END``,
  ``ROLLBACK``/``ABORT`` (and ``ROLLBACK TO``), ``SAVEPOINT``, ``RELEASE``,
  ``SET LOCAL``, ``SET TRANSACTION``, ``SET CONSTRAINTS``, ``SHOW``, ``LOCK``,
  ``COPY``, a cursor's ``DECLARE`` without ``WITH HOLD``, ``FETCH``, ``MOVE``,
  ``CLOSE``.

Everything else is dirty: ``SET``/``RESET``, ``SET SESSION ...``, ``SET
ROLE``, temporary objects, ``LISTEN``, ``PREPARE``, ``DECLARE ... WITH
HOLD``, ``DO``, ``CALL``, ``LOAD``, DDL, calls of any function not in
``SAFE_FUNCTIONS`` (``set_config``, ``pg_advisory_lock``, user functions),
other operators and casts, and string literals with a backslash (read
otherwise with ``standard_conforming_strings`` off). Names follow
PostgreSQL's lexer: any non-ASCII character is a letter, ``\\r`` ends a
``--`` comment.

Verdicts are cached per SQL text (the ORM repeats its statements).
"""

from __future__ import annotations

import functools
import re

#: A letter of a name: PostgreSQL takes any non-ASCII character as one.
_LETTER = r"(?:[A-Za-z_]|[^\x00-\x7f])"

#: Functions that leave the session as they found it (built-ins the ORM and
#: hand-written queries use). Transaction-scoped advisory locks end with the
#: transaction; session-scoped ones (pg_advisory_lock) are not here.
SAFE_FUNCTIONS: frozenset[str] = frozenset(
    [
        "abs",
        "array_agg",
        "array_append",
        "array_cat",
        "array_length",
        "array_position",
        "array_positions",
        "array_prepend",
        "array_remove",
        "array_replace",
        "array_to_string",
        "avg",
        "bit_and",
        "bit_or",
        "bool_and",
        "bool_or",
        "btrim",
        "cardinality",
        "cbrt",
        "ceil",
        "ceiling",
        "char_length",
        "character_length",
        "chr",
        "clock_timestamp",
        "coalesce",
        "concat",
        "concat_ws",
        "corr",
        "count",
        "covar_pop",
        "covar_samp",
        "cume_dist",
        "current_date",
        "current_setting",
        "current_time",
        "current_timestamp",
        "date_bin",
        "date_part",
        "date_trunc",
        "degrees",
        "dense_rank",
        "div",
        "every",
        "exp",
        "extract",
        "first_value",
        "floor",
        "format",
        "gen_random_uuid",
        "generate_series",
        "greatest",
        "initcap",
        "isfinite",
        "json_agg",
        "json_array_length",
        "json_build_array",
        "json_build_object",
        "json_extract_path",
        "json_extract_path_text",
        "json_object",
        "json_object_agg",
        "json_typeof",
        "jsonb_agg",
        "jsonb_array_elements",
        "jsonb_array_length",
        "jsonb_build_array",
        "jsonb_build_object",
        "jsonb_extract_path",
        "jsonb_extract_path_text",
        "jsonb_object",
        "jsonb_object_agg",
        "jsonb_path_exists",
        "jsonb_path_match",
        "jsonb_path_query",
        "jsonb_path_query_array",
        "jsonb_path_query_first",
        "jsonb_set",
        "jsonb_strip_nulls",
        "jsonb_typeof",
        "lag",
        "last_value",
        "lead",
        "least",
        "left",
        "length",
        "ln",
        "localtime",
        "localtimestamp",
        "log",
        "lower",
        "lpad",
        "ltrim",
        "make_date",
        "make_interval",
        "make_time",
        "make_timestamp",
        "make_timestamptz",
        "max",
        "md5",
        "min",
        "mod",
        "now",
        "nth_value",
        "ntile",
        "nullif",
        "octet_length",
        "overlay",
        "percent_rank",
        "percentile_cont",
        "percentile_disc",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_backend_pid",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
        "pi",
        "position",
        "power",
        "radians",
        "random",
        "rank",
        "regexp_match",
        "regexp_matches",
        "regexp_replace",
        "regexp_split_to_array",
        "repeat",
        "replace",
        "reverse",
        "right",
        "round",
        "row_number",
        "rpad",
        "rtrim",
        "sha224",
        "sha256",
        "sha384",
        "sha512",
        "sign",
        "sqrt",
        "starts_with",
        "statement_timestamp",
        "stddev",
        "stddev_pop",
        "stddev_samp",
        "string_agg",
        "string_to_array",
        "strpos",
        "substr",
        "substring",
        "sum",
        "timeofday",
        "to_char",
        "to_date",
        "to_json",
        "to_jsonb",
        "to_number",
        "to_timestamp",
        "to_tsquery",
        "to_tsvector",
        "transaction_timestamp",
        "translate",
        "trim",
        "trunc",
        "unnest",
        "upper",
        "uuid_generate_v4",
        "var_pop",
        "var_samp",
        "variance",
        "websearch_to_tsquery",
        "plainto_tsquery",
        "phraseto_tsquery",
        "ts_rank",
        "ts_rank_cd",
        "ts_headline",
        "setweight",
        "age",
        "justify_days",
        "justify_hours",
        "justify_interval",
    ]
)

#: Keywords that stand before "(" without being a function call: reserved
#: words, which no function may be named without quotes.
_NOT_CALLS = frozenset(
    [
        "all",
        "and",
        "any",
        "array",
        "as",
        "asymmetric",
        "between",
        "both",
        "case",
        "check",
        "collate",
        "column",
        "constraint",
        "create",
        "default",
        "distinct",
        "do",
        "else",
        "end",
        "except",
        "exists",
        "fetch",
        "for",
        "foreign",
        "from",
        "grant",
        "group",
        "grouping",
        "having",
        "ilike",
        "in",
        "intersect",
        "into",
        "is",
        "join",
        "lateral",
        "leading",
        "like",
        "limit",
        "not",
        "offset",
        "on",
        "only",
        "or",
        "order",
        "overlaps",
        "primary",
        "references",
        "returning",
        "row",
        "select",
        "similar",
        "some",
        "symmetric",
        "table",
        "tablesample",
        "then",
        "to",
        "trailing",
        "union",
        "unique",
        "using",
        "values",
        "when",
        "where",
        "window",
        "with",
        "varchar",
        "char",
        "character",
        "numeric",
        "decimal",
        "timestamp",
        "time",
        "interval",
        "bit",
        "float",
        "precision",
    ]
)
#: Unreserved keywords before "(" that are not a call after these words.
_NOT_CALLS_AFTER: dict[str, frozenset[str]] = {
    "by": frozenset(["order", "group", "partition"]),
    "filter": frozenset([")"]),
    "over": frozenset([")"]),
    "within": frozenset([")"]),
    "key": frozenset(["primary", "foreign"]),
    "conflict": frozenset(["on"]),
    "insert": frozenset(["then"]),
    "sets": frozenset(["grouping"]),
    "cube": frozenset(["by", ","]),
    "rollup": frozenset(["by", ","]),
    "materialized": frozenset(["as", "not"]),
    "varying": frozenset(["character", "bit"]),
}
_OP = "\x00"  # marks an operator token
_is_word = re.compile(_LETTER).match
_BLOCK_COMMENT_EDGE = re.compile(r"/\*|\*/")

_TRANSACTION_CONTROL = frozenset(
    [
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
        "show",
        "lock",
        "copy",
        "fetch",
        "move",
        "close",
    ]
)
_READS_WRITES = frozenset(
    ["select", "insert", "update", "delete", "merge", "with", "values", "table"]
)

_TOKEN = re.compile(
    rf"""
    (?P<space>\s+)
    | (?P<line_comment>--[^\n\r]*)
    | (?P<block_comment>/\*)
    | (?P<dollar>\$(?P<tag>{_LETTER}(?:[A-Za-z_0-9]|[^\x00-\x7f])*)?\$)
    | (?P<string>[EeBbXxUu]?&?'(?:[^']|'')*')
    | (?P<quoted>"(?:[^"]|"")*")
    | (?P<word>{_LETTER}(?:[A-Za-z_0-9$]|[^\x00-\x7f])*)
    | (?P<param>\$\d+|%\([^)]*\)s|%s)
    | (?P<semicolon>;)
    | (?P<paren>\()
    | (?P<cast>::)
    | (?P<op>(?:(?!--|/\*|%s|%\()[-+*/<>=~!@\#%^&|`?])+)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

#: Operators of PostgreSQL itself (comparison, arithmetic, string, JSON,
#: arrays, ranges, text search, geometry); any other may be a user's,
#: backed by a function we cannot see into.
SAFE_OPERATORS: frozenset[str] = frozenset(
    [
        "=",
        "<>",
        "!=",
        "<",
        ">",
        "<=",
        ">=",
        "+",
        "-",
        "*",
        "/",
        "%",
        "%%",
        "^",
        "||",
        "|/",
        "||/",
        "@",
        "&",
        "|",
        "#",
        "~",
        "<<",
        ">>",
        "!",
        "!!",
        "->",
        "->>",
        "#>",
        "#>>",
        "#-",
        "@>",
        "<@",
        "?",
        "?|",
        "?&",
        "@?",
        "@@",
        "@@@",
        "&&",
        "~~",
        "~~*",
        "!~~",
        "!~~*",
        "~*",
        "!~",
        "!~*",
        "-|-",
        "&<",
        "&>",
        "<<|",
        "|>>",
        "&<|",
        "|&>",
        "<->",
        "<->",
        "<#>",
        "##",
        "?#",
        "?-",
        "?-|",
        "?||",
        "~=",
        "=>",
        "<^",
        ">^",
    ]
)

#: Built-in types a cast (``::type``, ``CAST(... AS type)``) may name; a
#: cast to another type may run a user's function.
SAFE_TYPES: frozenset[str] = frozenset(
    [
        "int",
        "int2",
        "int4",
        "int8",
        "integer",
        "smallint",
        "bigint",
        "numeric",
        "decimal",
        "real",
        "float",
        "float4",
        "float8",
        "double",
        "text",
        "varchar",
        "char",
        "character",
        "bpchar",
        "name",
        "boolean",
        "bool",
        "date",
        "time",
        "timestamp",
        "timestamptz",
        "timetz",
        "interval",
        "uuid",
        "json",
        "jsonb",
        "bytea",
        "inet",
        "cidr",
        "macaddr",
        "macaddr8",
        "money",
        "bit",
        "varbit",
        "tsvector",
        "tsquery",
        "regconfig",
        "regclass",
        "regtype",
        "regproc",
        "regprocedure",
        "regnamespace",
        "regrole",
        "oid",
        "xid",
        "xml",
        "point",
        "line",
        "lseg",
        "box",
        "path",
        "polygon",
        "circle",
        "int4range",
        "int8range",
        "numrange",
        "tsrange",
        "tstzrange",
        "daterange",
        "int4multirange",
        "int8multirange",
        "nummultirange",
        "tsmultirange",
        "tstzmultirange",
        "datemultirange",
    ]
)


def _statements(sql: str) -> list[list[str]] | None:
    """The statements of *sql* as lists of tokens (words lowercased, quoted names as
    ``"``-prefixed, ``(`` kept, literals and comments dropped); None if unparsable."""
    statements: list[list[str]] = [[]]
    pos = 0
    n = len(sql)
    while pos < n:
        m = _TOKEN.match(sql, pos)
        if m is None:  # pragma: no cover - "other" matches any character
            return None
        kind = m.lastgroup
        pos = m.end()
        if kind == "block_comment":
            depth = 1  # PostgreSQL's block comments nest
            while depth:
                nxt = _BLOCK_COMMENT_EDGE.search(sql, pos)
                if nxt is None:
                    return None
                depth += 1 if nxt.group() == "/*" else -1
                pos = nxt.end()
        elif kind == "dollar":
            end = sql.find(m.group(), pos)
            if end < 0:
                return None
            pos = end + len(m.group())
            statements[-1].append("'")  # a literal (a DO body, a function body)
        elif kind == "string":
            if "\\" in m.group() and not m.group().lower().startswith("e'"):
                # With standard_conforming_strings off (a server, database or
                # role may set it), a backslash escapes a quote here too.
                return None
            if m.group().lower().startswith("e'") and m.group().count("\\"):
                # E'' strings escape quotes with a backslash: rescan it.
                end = _escape_string_end(sql, m.start() + 2)
                if end < 0:
                    return None
                pos = end
            statements[-1].append("'")
        elif kind == "quoted":
            statements[-1].append('"' + m.group()[1:-1].replace('""', '"'))
        elif kind == "word":
            statements[-1].append(m.group().lower())
        elif kind == "semicolon":
            statements.append([])
        elif kind == "paren":
            statements[-1].append("(")
        elif kind == "cast":
            statements[-1].append("::")
        elif kind == "op":
            statements[-1].extend(_operators(m.group()))
        elif kind == "other":
            if m.group() in "'\"":
                return None  # an unterminated literal or name
            statements[-1].append(m.group())
    return [s for s in statements if s]


def _escape_string_end(sql: str, pos: int) -> int:
    """Index after the E'...' string whose body starts at *pos*, or -1."""
    n = len(sql)
    while pos < n:
        c = sql[pos]
        if c == "\\":
            pos += 2
        elif c == "'":
            if pos + 1 < n and sql[pos + 1] == "'":
                pos += 2
            else:
                return pos + 1
        else:
            pos += 1
    return -1


def _operators(op: str) -> list[str]:
    """Operator tokens of *op*, split as PostgreSQL splits them: a trailing + or
    - belongs to the next operand unless the operator has one of ~!@#%^&|`?."""
    parts: list[str] = []
    while len(op) > 1 and op[-1] in "+-" and not any(c in op for c in "~!@#%^&|`?"):
        parts.insert(0, _OP + op[-1])
        op = op[:-1]
    return [_OP + op, *parts]


def _only_safe_calls(tokens: list[str]) -> bool:
    """No call, operator or cast that may run code other than PostgreSQL's own."""
    n = len(tokens)
    for i, token in enumerate(tokens):
        if token[0] == _OP:
            if token[1:] not in SAFE_OPERATORS:
                return False  # a user's operator runs a user's function
        elif token == "::":
            if not _safe_type(tokens, i + 1):
                return False  # a cast to a user's type may run a user's function
        elif token == "(" and i > 0:
            name = tokens[i - 1]
            if _names_a_table(tokens, i - 1):
                continue  # INSERT INTO "t" ("a", "b"): a column list
            if i >= 2 and tokens[i - 2] == "::":
                continue  # a type's modifier: x::varbit(5) (the type is checked)
            if name.startswith('"'):
                return False  # a quoted name called: a user function
            if i >= 2 and tokens[i - 2] == ".":
                schema = tokens[i - 3] if i >= 3 else ""
                if schema != "pg_catalog":
                    return False  # schema-qualified: a user function
            if not _is_word(name) or name in _NOT_CALLS:
                continue  # an operator, a literal, a parenthesis, a reserved word
            if i >= 2 and tokens[i - 2] in _NOT_CALLS_AFTER.get(name, ()):
                continue  # ORDER BY (, count(*) FILTER (, ON CONFLICT (, ...
            if name == "cast":
                if not _safe_cast(tokens, i, n):
                    return False
                continue
            if name not in SAFE_FUNCTIONS:
                return False
    return True


def _safe_type(tokens: list[str], i: int) -> bool:
    """Whether tokens[i] starts a built-in type name (pg_catalog. allowed)."""
    if i + 2 < len(tokens) and tokens[i] == "pg_catalog" and tokens[i + 1] == ".":
        i += 2
    if i >= len(tokens):
        return False
    name = tokens[i][1:] if tokens[i].startswith('"') else tokens[i]
    return name in SAFE_TYPES


def _safe_cast(tokens: list[str], start: int, n: int) -> bool:
    """CAST(... AS type): the type after the AS at the parenthesis' own level."""
    depth = 0
    for j in range(start, n):
        token = tokens[j]
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            if depth == 0:
                return False  # no AS found
        elif token == "as" and depth == 1:
            return _safe_type(tokens, j + 1)
    return False


def _names_a_table(tokens: list[str], i: int) -> bool:
    """Whether tokens[i] is the table of ``INTO`` (optionally schema-qualified)."""
    if i >= 2 and tokens[i - 1] == ".":
        i -= 2
    return i >= 1 and tokens[i - 1] == "into"


def _is_clean(tokens: list[str]) -> bool:
    first = tokens[0]
    if first in _READS_WRITES or first == "explain":
        if first == "explain":
            rest = [t for t in tokens[1:] if t not in ("analyze", "verbose", "(")]
            if not rest or rest[0] not in _READS_WRITES:
                return False
        for i, token in enumerate(tokens):
            if token == "into" and (i == 0 or tokens[i - 1] not in ("insert", "merge")):
                return False  # SELECT ... INTO creates a table, maybe a temporary one
        return _only_safe_calls(tokens)
    if first == "set":
        second = tokens[1] if len(tokens) > 1 else ""
        if len(tokens) > 2 and tokens[2] == ".":
            return False  # SET local.tenant = ...: a custom setting, for the session
        return second in ("local", "transaction", "constraints")
    if first == "declare":
        for i, token in enumerate(tokens):
            if token == "with" and i + 1 < len(tokens) and tokens[i + 1] == "hold":
                return False
            if token == "for":
                rest = tokens[i + 1 :]
                return bool(rest) and rest[0] in _READS_WRITES and _is_clean(rest)
        return False
    if first in _TRANSACTION_CONTROL:
        if first == "copy":
            if len(tokens) > 1 and tokens[1] == "(":
                return _only_safe_calls(tokens[1:])  # COPY (query) TO ...
            # COPY table [(columns)] FROM/TO ... [WITH (...)] [WHERE ...]
            for i, token in enumerate(tokens):
                if token in ("from", "to"):
                    return _only_safe_calls(tokens[i:])
            return False
        return True
    return False


@functools.lru_cache(maxsize=4096)
def may_change_session(sql: str | bytes) -> bool:
    """Whether running *sql* may change the session's state (True: reset before reuse)."""
    if isinstance(sql, bytes):
        try:
            sql = sql.decode()
        except UnicodeDecodeError:
            return True
    statements = _statements(sql)
    if statements is None:
        return True
    return not all(_is_clean(tokens) for tokens in statements)
