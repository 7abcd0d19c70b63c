"""A Django project served by a real server process (gunicorn, uvicorn): start, wait, stop.

The tests (``test_gunicorn``, ``test_async``, ``test_deployment``) and the
benchmarks' end-to-end scenario serve the test project this way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

TEST_SETTINGS = "testproject.settings"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> Any:
    """GET *url*; its JSON body."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def project_dir(settings: str = TEST_SETTINGS) -> Path:
    """The directory that holds the package of the *settings* module, as this
    process imports it (the test project's, under pytest)."""
    package = settings.partition(".")[0]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(
            f"{package!r} is not importable here: pass project= (the directory "
            f"holding {package}/) to start_server()"
        )
    return Path(next(iter(spec.submodule_search_locations))).parent


def start_server(
    argv: list[str], *, project: Path | None = None, settings: str = TEST_SETTINGS, **env: str
) -> subprocess.Popen[str]:
    """``python -m <argv>`` in the Django project *project* (by default the
    one that holds *settings*), with *env* added to ours.

    stdout and stderr are pipes: read them through ``stop_server()``.
    """
    project = project or project_dir(settings)
    return subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=project,
        env={
            **os.environ,
            "PYTHONPATH": str(project),
            "DJANGO_SETTINGS_MODULE": settings,
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_serving(url: str, proc: subprocess.Popen[str], deadline: float = 30) -> None:
    """Return once *url* answers; fail at once if the server exits."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not start serving")


def stop_server(proc: subprocess.Popen[str]) -> str:
    """SIGTERM (a graceful stop), SIGKILL after 20 s; the server's stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    return stderr or ""
