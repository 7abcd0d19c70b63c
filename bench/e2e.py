"""End-to-end scenario of the benchmark suite: gunicorn serving the test project, wrk loading it.

Run through ``bench/suite.py --scenarios e2e``. Each strategy serves the
same project (``TESTPROJECT_DB_STRATEGY``) under gunicorn with 2 gthread
workers of 4 threads; wrk, outside the server's processes, keeps 16
connections busy on a view that reads and writes through the ORM (100 rows,
picked at random, so writers rarely wait on one another's row locks).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from dpp_devtools.servers import free_port, start_server, stop_server, wait_serving

ROOT = Path(__file__).resolve().parent.parent
TESTPROJECT = ROOT / "testproject"

# Names in dpp_devtools.strategies.STRATEGIES, passed to the test project's
# settings as TESTPROJECT_DB_STRATEGY.
STRATEGIES = ("persistent", "django pool", "ours (defaults)")
WRK_SCRIPT = """
request = function()
  return wrk.format(nil, "/hit/?name=n" .. math.random(1, 100))
end
"""


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (seconds) and errors from ``wrk --latency``."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    out: dict[str, Any] = {"errors": 0}
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            out["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            value = parts[1]
            unit = next(u for u in ("us", "ms", "s") if value.endswith(u))
            out[f"latency_p{parts[0][:-1]}"] = float(value[: -len(unit)]) * units[unit]
        elif "Non-2xx" in line or line.strip().startswith("Socket errors"):
            out["errors"] += sum(int(x.strip(",")) for x in parts if x.strip(",").isdigit())
    if "rps" not in out:
        raise RuntimeError(f"wrk printed no throughput: {text[-2000:]}")
    return out


def serve_and_load(
    strategy: str, seconds: int, sessions_sampler: Any, **env: str
) -> dict[str, Any]:
    """*env*: more environment for the server (PGPORT of a pooler, POOL_OPTIONS_JSON)."""
    port = free_port()
    server = start_server(
        ["gunicorn", "-w", "2", "-k", "gthread", "--threads", "4",
         "-b", f"127.0.0.1:{port}", "--log-level", "warning", "testproject.wsgi:application"],
        project=TESTPROJECT,
        TESTPROJECT_DB_STRATEGY=strategy,
        POOL_MAX_SIZE="4",
        **env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    script = None
    try:
        wait_serving(url + "/ping/", server)
        for _ in range(40):  # both workers warm
            urllib.request.urlopen(url + "/hit/?name=warm", timeout=5).read()
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(WRK_SCRIPT)
            script = f.name
        sessions = sessions_sampler()
        wrk = subprocess.run(
            [shutil.which("wrk") or "wrk", "-t", "2", "-c", "16", "-d", f"{seconds}s",
             "--latency", "-s", script, url],
            capture_output=True, text=True, timeout=seconds + 60,
        )  # fmt: skip
        peak = sessions.stop()
    finally:
        if script:
            os.unlink(script)
        stop_server(server)
    return {**parse_wrk(wrk.stdout), "server_connections": peak}


def migrate() -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=TESTPROJECT,
        env={**os.environ, "PYTHONPATH": str(TESTPROJECT)},
        check=True,
    )
