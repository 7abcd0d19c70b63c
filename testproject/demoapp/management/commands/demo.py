"""The main job: migrate, serve a burst of real HTTP requests, show the pool."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
from django.core.wsgi import get_wsgi_application
from django.db import connection


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Command(BaseCommand):
    help = "Migrate, serve a burst of requests from several threads, print the pool's state."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--threads", type=int, default=8)
        parser.add_argument("--requests", type=int, default=50, help="per thread")

    def handle(self, *args: Any, threads: int, requests: int, **options: Any) -> None:
        call_command("migrate", verbosity=0)
        connection.close()
        server = ThreadedWSGIServer(("127.0.0.1", 0), QuietHandler)
        server.set_app(get_wsgi_application())
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
        url = f"http://127.0.0.1:{server.server_port}"
        self.stdout.write(
            f"Serving the test project at {url} on {connection.settings_dict['HOST']}:"
            f"{connection.settings_dict['PORT']}/{connection.settings_dict['NAME']}"
        )

        errors: list[str] = []
        backends: set[int] = set()

        def client(n: int) -> None:
            for i in range(requests):
                path = "/hit/?name=demo" if i % 2 else "/ping/"
                try:
                    with urllib.request.urlopen(url + path, timeout=30) as resp:
                        data = json.load(resp)
                    if "backend_pid" in data:
                        backends.add(data["backend_pid"])
                except Exception as exc:  # shown below
                    errors.append(f"{path}: {exc}")

        t0 = time.perf_counter()
        workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        server.shutdown()
        server.server_close()

        total = threads * requests
        pool = connection.pool
        assert pool is not None
        stats = pool.get_stats()
        with connection.cursor() as cursor:
            cursor.execute("SELECT hits FROM demoapp_counter WHERE name = 'demo'")
            row = cursor.fetchone()
        connection.close()
        self.stdout.write(
            f"{total} requests from {threads} threads in {elapsed:.2f} s "
            f"({total / elapsed:.0f} req/s), {len(errors)} errors; "
            f"{len(backends)} server connections served them; counter 'demo' = {row[0] if row else 0}"
        )
        self.stdout.write(f"Pool {pool.name!r}: min_size={pool.min_size} max_size={pool.max_size}")
        for key in sorted(stats):
            self.stdout.write(f"  {key:20} {stats[key]}")
        for err in errors[:5]:
            self.stderr.write(err)
        if errors:
            raise SystemExit(1)
