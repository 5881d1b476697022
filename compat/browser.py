"""Headless Chromium driven through the DevTools protocol, for the web console's tests.

`Browser` starts one `chromium --headless` process with its own profile directory and
`--remote-debugging-port=0` (Chromium picks a free port and writes it to `DevToolsActivePort`
in the profile), connects to it over a WebSocket (the `websocket-client` package), opens one
page and attaches to it. Every console message, uncaught exception and browser log entry of
that page is collected in `problems` (errors and warnings), so a test can assert that a page
loaded cleanly. The process is ended by its pid at `close()`.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import websocket

START_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 30.0


def chromium_binary() -> Optional[str]:
    """Debian's `chromium` (or `$CHROMIUM`), or None."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(Exception):
    pass


class Browser:
    def __init__(self, profile_dir: Path, width: int = 1360, height: int = 900):
        binary = chromium_binary()
        if binary is None:
            raise BrowserError("chromium is not installed (scripts/test.sh installs it)")
        profile_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = profile_dir / "chromium.log"
        arguments = [
            binary,
            "--headless",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile_dir}",
            f"--window-size={width},{height}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--mute-audio",
            "about:blank",
        ]
        if os.geteuid() == 0:
            arguments.insert(1, "--no-sandbox")  # Chromium refuses to run as root with one
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                arguments, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self._ids = itertools.count(1)
        self.problems: list[str] = []
        self.socket = None
        try:
            # No Origin header: DevTools refuses WebSocket connections from web origins.
            self.socket = websocket.create_connection(
                self._browser_endpoint(profile_dir), timeout=COMMAND_TIMEOUT_S, suppress_origin=True
            )
            target = self._command("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self._command("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.command(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _browser_endpoint(self, profile_dir: Path) -> str:
        """The browser's WebSocket URL, from `DevToolsActivePort` (port, then path)."""
        active_port = profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise BrowserError(f"chromium exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                port, path = active_port.read_text().split("\n")[:2]
                if port and path:
                    return f"ws://127.0.0.1:{port}{path}"
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise BrowserError(f"chromium did not open its DevTools port in {START_TIMEOUT_S} s:\n{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    # ---------------------------------------------------------------- the protocol

    def _command(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> dict:
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def command(self, method: str, params: Optional[dict] = None) -> dict:
        """A DevTools command to the page."""
        return self._command(method, params, self.session)

    def _event(self, message: dict) -> None:
        method = message.get("method")
        params = message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            self.problems.append(f"uncaught exception: {description}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            text = " ".join(str(argument.get("value", argument.get("description", ""))) for argument in params.get("args", []))
            self.problems.append(f"console.{params['type']}: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            entry = params["entry"]
            self.problems.append(f"browser {entry['level']} ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.command(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        reply = self.command("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise BrowserError(f"navigating to {url}: {reply['errorText']}")

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page (its full height, at the window's width)."""
        metrics = self.command("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        image = self.command(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(image["data"]))

    def close(self) -> None:
        if self.socket is not None:
            try:
                self.socket.close()
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
