"""Fixtures of the fault suite: an S3 endpoint that a test can take down and bring back.

The endpoint is a second moto server in the test process, on a fixed free port, serving the
same in-memory buckets as the session server of tests/conftest_s3.py (moto keeps its state in
module-level backends, not in the HTTP server). So an outage loses no stored object, as with a
real S3 or MinIO whose disks outlive a restart; a moto *process* restarted instead would come back
empty, and then the retried upload could never complete the checkpoint it was writing. Taking it
down closes the listening socket and every open connection: clients see refused and reset
connections, as when a server process dies, not a slow server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from s3fs import S3FileSystem


class RestartableS3:
    """moto's S3 on 127.0.0.1:`port`; `stop()`/`start()` it, or `outage(seconds)` in a thread."""

    def __init__(self, port: int):
        self.port, self.endpoint = port, f"http://127.0.0.1:{port}"
        self._server = self._thread = None
        self.restarts: list[threading.Thread] = []
        self.down_at: float | None = None
        self.up_at: float | None = None

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import ThreadedWSGIServer

        class Server(ThreadedWSGIServer):
            """Remembers its open connections, so stopping can cut them."""
            def __init__(self, *args, **kw):
                super().__init__(*args, **kw)
                self.connections, self.lock = set(), threading.Lock()

            def process_request(self, request, client_address):
                with self.lock:
                    self.connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with self.lock:
                    self.connections.discard(request)
                super().shutdown_request(request)

        app = DomainDispatcherApplication(create_backend_app)
        self._server = Server("127.0.0.1", self.port, app, handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.up_at = time.monotonic()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()  # new connections are refused from here on
        with server.lock:
            open_now = list(server.connections)
        for conn in open_now:  # and the open ones are reset mid-request
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        self.down_at = time.monotonic()

    def outage(self, seconds: float) -> threading.Thread:
        """Stop now; start again on the same port after `seconds`, from a thread (returned)."""
        self.stop()
        thread = threading.Thread(target=lambda: (time.sleep(seconds), self.start()), daemon=True)
        thread.start()
        self.restarts.append(thread)
        return thread


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def restartable_s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RestartableS3]:
    """A RestartableS3 that every new `Store("s3://...")` of this test talks to (through
    AWS_ENDPOINT_URL_S3); the session endpoint `s3_endpoint` stays up to watch the same buckets."""
    server = RestartableS3(_free_port())
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    # fsspec caches filesystems by their arguments, not the environment: start and end afresh.
    S3FileSystem.clear_instance_cache()
    try:
        yield server
    finally:
        for thread in server.restarts:  # never leave a restart pending for a later test's port
            thread.join()
        server.stop()
        S3FileSystem.clear_instance_cache()
