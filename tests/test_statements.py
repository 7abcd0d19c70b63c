"""The classifier behind reset_session="auto": clean only what it recognises."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from django_pooled_pg.statements import may_change_session

CLEAN = [
    "SELECT 1",
    "select count(*) from pg_class",
    '  SELECT "demoapp_hit"."id", "demoapp_hit"."name" FROM "demoapp_hit" WHERE "demoapp_hit"."name" = %s LIMIT 21',
    'INSERT INTO "demoapp_hit" ("name", "count") VALUES (%s, %s) RETURNING "demoapp_hit"."id"',
    'INSERT INTO "public"."t" ("a") VALUES (1) ON CONFLICT ("a") DO UPDATE SET "a" = EXCLUDED."a"',
    'UPDATE "t" SET "n" = ("t"."n" + 1) WHERE "t"."id" IN (SELECT U0."id" FROM "t" U0)',
    'DELETE FROM "t" WHERE "t"."id" = ANY(%s)',
    "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
    "VALUES (1), (2)",
    "SELECT COALESCE(UPPER(name), '') FROM t -- trailing comment",
    "/* a comment; with a semicolon */ SELECT 1",
    "/* nested /* comment */ still */ SELECT 1",
    "SELECT 'it''s; SET x = 1' AS s",
    "SELECT E'\\'; RESET ALL' AS s",
    "SELECT $$ SET search_path TO x $$",
    "SELECT CAST(x AS varchar(20)), x::numeric(10, 2) FROM t",
    "SELECT pg_catalog.count(*) FROM t",
    "BEGIN",
    "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "COMMIT",
    "ROLLBACK",
    'SAVEPOINT "s1"',
    'RELEASE SAVEPOINT "s1"',
    'ROLLBACK TO SAVEPOINT "s1"',
    "SET LOCAL statement_timeout = '1s'",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "SET CONSTRAINTS ALL IMMEDIATE",
    "SHOW TimeZone",
    "LOCK TABLE t IN SHARE MODE",
    "COPY t FROM STDIN",
    'COPY "t" ("a", "b") FROM STDIN',
    "COPY t (a) TO STDOUT WITH (FORMAT csv, HEADER true)",
    "COPY (SELECT count(*) FROM t) TO STDOUT",
    'DECLARE "_django_curs_1" NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1',
    "DECLARE c CURSOR FOR SELECT * FROM t",
    'FETCH FORWARD 100 FROM "_django_curs_1"',
    "MOVE 10 IN c",
    'CLOSE "_django_curs_1"',
    "SELECT pg_advisory_xact_lock(1)",
    "EXPLAIN SELECT 1",
    "SELECT 1; SELECT 2",
    # Built-in operators, casts and keywords before a parenthesis.
    'SELECT "t"."a"::text, CAST("t"."b" AS integer), (%s)::numeric(10, 2) FROM "t"',
    'SELECT * FROM "t" WHERE "t"."a" >= %s AND "t"."b" = -1 AND "t"."c" <> 2',
    'SELECT "t"."j" -> %s, "t"."j" ->> %s, "t"."j" @> %s, "t"."tags" && %s FROM "t"',
    'SELECT ROW_NUMBER() OVER (PARTITION BY "a" ORDER BY "b") FROM "t"',
    'SELECT COUNT(*) FILTER (WHERE "x" > 1) FROM "t" GROUP BY ROLLUP ("a", "b")',
    "SELECT (now() AT TIME ZONE 'UTC')::date, '2026-01-01'::timestamptz - interval '1 day'",
    'SELECT "t"."name" || %s, "t"."n" %% 2 FROM "t"',
    "SELECT 'ñandú' AS \"año\", 1 AS año",
    "SELECT x::varbit(5), y::bpchar(3), z::pg_catalog.int4 FROM t",
]

DIRTY = [
    "SET search_path TO app",
    "set TimeZone = 'Asia/Tokyo'",
    "SET SESSION statement_timeout = 5",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET ROLE app",
    "SET SESSION AUTHORIZATION app",
    "RESET ALL",
    "SELECT set_config('search_path', 'x', false)",
    "CREATE TEMP TABLE t (x int)",
    "CREATE TEMPORARY TABLE t AS SELECT 1",
    "SELECT 1 AS x INTO TEMP t",
    "SELECT 1 AS x INTO TEMPORARY TABLE t",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_try_advisory_lock(1)",
    "LISTEN channel",
    "PREPARE p AS SELECT 1",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "DO $$ BEGIN PERFORM set_config('x.y', '1', false); END $$",
    "CALL my_proc()",
    "COPY (SELECT my_function()) TO STDOUT",
    "COPY t FROM STDIN WHERE my_function(x)",
    "SELECT 1 ### 2",
    "SELECT 1::my_type",
    "SELECT 1::my_type(5)",
    "SELECT CAST(1 AS my_type)",
    "SELECT nothing()",
    "SELECT set(1)",
    "SELECT €uro()",
    "SELECT 1 --\r, set_config('x.y', '1', false)",
    "SELECT $ñ$ ' $ñ$, set_config('x.y', '1', false) --'",
    "SET local.tenant = '42'",
    "SET transaction.tenant = '42'",
    "SELECT 1 AS x INTO pg_temp.t",
    "SELECT 1 AS x INTO TABLE t",
    "SELECT 'a\\', set_config('x.y', '1', false) --'",
    "LOAD 'auto_explain'",
    "SELECT my_function(1)",
    'SELECT "app"."fn"(1)',
    "SELECT app.fn(1)",
    "SELECT 1; SET search_path TO x",
    "-- comment first\nSET x.y = 1",
    "/* comment */ SET x.y = 1",
    "DISCARD ALL",
    "VACUUM",
    "SELECT 'unterminated",
    "SELECT 1 /* unterminated",
    b"SET x.y = 1",
]


@pytest.mark.parametrize("sql", CLEAN)
def test_recognised_statements_are_clean(sql: str) -> None:
    assert may_change_session(sql) is False


@pytest.mark.parametrize("sql", DIRTY)
def test_anything_else_marks_the_session(sql: str | bytes) -> None:
    assert may_change_session(sql) is True


def test_the_orms_statements_are_clean(transactional_db: None) -> None:
    """Real SQL from the ORM: reads, writes, aggregates, bulk operations, chunked reads."""
    from django.db.models import Count, F, Max, Q
    from django.db.models.functions import Coalesce, Lower

    from demoapp.models import Counter

    with CaptureQueriesContext(connection) as queries:
        Counter.objects.create(name="a", hits=1)
        Counter.objects.bulk_create([Counter(name=f"b{i}", hits=i) for i in range(3)])
        Counter.objects.filter(name__startswith="b").update(hits=F("hits") + 1)
        list(Counter.objects.filter(Q(name="a") | Q(hits__gt=1)).order_by("-hits")[:5])
        Counter.objects.aggregate(Max("hits"), n=Count("id"))
        list(Counter.objects.annotate(low=Lower("name"), c=Coalesce("hits", 0)).values("low", "c"))
        Counter.objects.get_or_create(name="c", defaults={"hits": 0})
        list(Counter.objects.filter(name__in=["a", "c"]).iterator(chunk_size=2))
        Counter.objects.filter(name="c").delete()
        Counter.objects.exists()
    assert len(queries) >= 10
    dirty = [q["sql"] for q in queries if may_change_session(q["sql"])]
    # Only the chunked read: in autocommit Django declares its cursor WITH
    # HOLD, which outlives the transaction (a reset closes it).
    assert len(dirty) == 1 and " CURSOR WITH HOLD FOR SELECT " in dirty[0], dirty


def test_reported_parameters_see_a_change_made_inside_a_function(transactional_db: None) -> None:
    """The second net: PostgreSQL reports these parameters on its own, also when a
    function changes them, and reading them costs no round trip."""
    from django_pooled_pg.watch import reported_parameters

    connection.ensure_connection()
    pgconn = connection.connection.pgconn
    before = reported_parameters(pgconn)
    assert before[0] is not None  # TimeZone
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert reported_parameters(pgconn) == before
        # A function call the classifier cannot see into, changing the zone.
        cursor.execute("SELECT set_config('TimeZone', 'Asia/Tokyo', false)")
        after = reported_parameters(pgconn)
        cursor.execute("RESET TimeZone")
    assert after != before and after[0] == b"Asia/Tokyo"
