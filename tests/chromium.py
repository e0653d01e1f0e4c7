"""Headless Chromium driven over the DevTools protocol: open a page, wait until its rendered text
shows what a test expects, take a screenshot. For the Prefect UI, a single-page app whose content
exists only after its JavaScript has run and fetched from the API.

The browser listens on 127.0.0.1 only (its DevTools port, chosen by itself), keeps its profile in
a temporary directory, and is stopped by PID when the `Browser` context exits.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no Chromium found: run `make system-deps` (or `apt-get install chromium`)")


class Browser:
    """One headless Chromium with one page (a tab)."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="btx-chromium-"))
        self.proc: subprocess.Popen | None = None
        self._ws = None
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        argv = [find_chromium(), "--headless", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-sync", "--hide-scrollbars",
                "--mute-audio", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}",
                "about:blank"]
        # No sandbox: it cannot run as root nor in most CI containers, and this browser only
        # ever opens pages the tests serve themselves on 127.0.0.1.
        argv.insert(1, "--no-sandbox")
        log = open(self.profile / "chromium.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        try:
            port = self._devtools_port()
            pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            page = next(p for p in pages if p.get("type") == "page")
            self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
        if self.proc is not None and self.proc.poll() is None:
            from tests.prefect_harness import stop_groups

            stop_groups({"chromium": self.proc}, grace_s=6.0)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _devtools_port(self, timeout: float = 60.0) -> int:
        # With port 0, Chromium picks a free port and writes it to DevToolsActivePort.
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: "
                                   f"{(self.profile / 'chromium.log').read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(marker.read_text().split()[0])
            time.sleep(0.2)
        raise TimeoutError("chromium did not open its DevTools port")

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict:
        """One DevTools command; events that arrive meanwhile are dropped."""
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        """The page's rendered text, as a user sees it."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles: list[str], timeout: float = 60.0) -> str:
        """Wait until the rendered text contains every needle; return that text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def click_text(self, label: str) -> bool:
        """Click the first visible button, link or tab whose own text is `label`."""
        return bool(self.evaluate(
            "(() => { const want = %s;"
            " const nodes = [...document.querySelectorAll('button, a, [role=tab], li, span')];"
            " const hit = nodes.find(n => n.offsetParent !== null && n.innerText && n.innerText.trim() === want);"
            " if (hit) { hit.click(); return true; } return false; })()" % json.dumps(label)))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
