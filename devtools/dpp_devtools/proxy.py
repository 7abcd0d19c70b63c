"""A TCP proxy for fault injection: forwards, or goes silent on demand.

``blackhole()`` stops forwarding in both directions without closing a
socket: the kernel still acknowledges what peers send, so a client sees a
server that accepts and never answers (as psycopg_pool's test proxy does).
``resume()`` forwards again; connections accepted meanwhile are connected
upstream then. ``silence_new()`` leaves established connections forwarding
and never answers new ones, as an address that drops packets does for a
client that connects (the failover tests: a primary gone silent while the
sessions it had end). ``accepted`` records when each client connected.
``connect_delay`` (seconds) slows each new connection's set-up, as a
distant or busy server does (the benchmarks' spike scenario).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class Proxy:
    def __init__(self, target_host: str, target_port: int, connect_delay: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.connect_delay = connect_delay
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self.accepted: list[float] = []
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._stopped = threading.Event()
        self._silent_new = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def blackhole(self) -> None:
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()
        self._silent_new.clear()

    def silence_new(self) -> None:
        self._silent_new.set()

    def close(self) -> None:
        self._stopped.set()
        self._forwarding.set()
        self._listener.close()
        for s in list(self._sockets):
            with contextlib.suppress(OSError):
                s.close()

    def attempts_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.accepted if start <= t < end)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            self._sockets.append(client)
            if self._silent_new.is_set():
                continue  # accepted and never answered (closed by close())
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.connect_delay:
            time.sleep(self.connect_delay)
        self._forwarding.wait()
        if self._stopped.is_set():
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        self._sockets.append(upstream)
        peers = {client: upstream, upstream: client}
        try:
            while not self._stopped.is_set():
                if not self._forwarding.is_set():
                    self._forwarding.wait(0.05)
                    continue
                readable, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()
