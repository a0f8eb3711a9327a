"""Open pages in headless Chromium and report what a reader's browser would show, over the DevTools
protocol (``websocket-client``, already in the lock; no browser download, no extra driver).

    with Chromium() as browser:
        report = browser.check("file:///.../build/index.html")
        report.errors, report.title, report.images

Requests leaving ``file://`` never reach the network: a script on :data:`STUBS` (the CDN MathJax of
the book's pages) is answered with a stub, anything else is refused and listed in ``report.external``,
so a page that needs the network to render is caught, online or not.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import websocket

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
STUBS = {r"^https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/": "window.MathJax = window.MathJax || {};"}
INSPECT = """JSON.stringify({
  title: document.title,
  h1: (() => { const h = document.querySelector('h1');
               return h ? {text: h.textContent.trim(), height: h.getBoundingClientRect().height} : null; })(),
  images: [...document.images].map(i => ({src: i.src.startsWith('data:') ? i.src.slice(0, 40) : i.src,
                                          complete: i.complete,
                                          width: i.naturalWidth, height: i.naturalHeight})),
  links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
  details: [...document.querySelectorAll('details')].map(d => {
    const summary = d.querySelector(':scope > summary'), loaded_open = d.open;
    d.open = false; const folded = d.getBoundingClientRect().height;
    d.open = true; const unfolded = d.getBoundingClientRect().height;
    d.open = loaded_open;
    const cell = d.closest('.jp-Cell'), outputs = cell && cell.querySelector('.jp-OutputArea');
    return {class: d.className, summary: summary ? summary.textContent.trim() : null, open: loaded_open,
            folded_height: folded, unfolded_height: unfolded,
            outputs_height: outputs ? outputs.getBoundingClientRect().height : null};
  }),
})"""


def find_chromium() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@dataclass
class PageReport:
    url: str
    title: str = ""
    h1: dict | None = None
    images: list[dict] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    # each <details>: class, summary text, open as loaded, height folded and unfolded, and the height of the
    # outputs of the notebook cell it is in (None outside a code cell)
    details: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    external: list[str] = field(default_factory=list)  # requests that would have left the machine


class Chromium:
    """A headless Chromium with one DevTools connection; use as a context manager."""

    def __init__(self, executable: str | None = None, timeout: float = 30.0):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
        self.timeout = timeout
        self._id = 0

    def __enter__(self) -> Chromium:
        self._profile = tempfile.TemporaryDirectory(prefix="secure-ai-chromium-")
        self._process = subprocess.Popen(
            [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={self._profile.name}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + self.timeout
        url = None
        while url is None and time.monotonic() < deadline:
            line = self._process.stderr.readline()
            if not line and self._process.poll() is not None:
                break
            if match := re.search(r"DevTools listening on (ws://\S+)", line):
                url = match[1]
        if url is None:
            self.__exit__(None, None, None)
            raise RuntimeError(f"{self.executable} did not start its DevTools endpoint")
        self._ws = websocket.create_connection(url, timeout=self.timeout, suppress_origin=True)
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "_ws", None) is not None:
            self._ws.close()
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._profile.cleanup()

    # --- protocol ---------------------------------------------------------------------------------------

    def _send(self, method: str, session: str | None = None, **params) -> int:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        return self._id

    def _call(self, method: str, session: str | None = None, **params) -> dict:
        wanted = self._send(method, session, **params)
        while True:
            message = self._receive()
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def _receive(self) -> dict:
        message = json.loads(self._ws.recv())
        if "method" in message:
            self._on_event(message)
        return message

    def _on_event(self, message: dict) -> None:
        report, session, params = self._report, message.get("sessionId"), message.get("params", {})
        method = message["method"]
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            report.errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            report.errors.append(f"exception: {details.get('exception', {}).get('description') or details}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            report.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Fetch.requestPaused":
            url = params["request"]["url"]
            stub = next((body for pattern, body in STUBS.items() if re.match(pattern, url)), None)
            if stub is not None:
                self._send("Fetch.fulfillRequest", session, requestId=params["requestId"], responseCode=200,
                           responseHeaders=[{"name": "Content-Type", "value": "text/javascript"}],
                           body=base64.b64encode(stub.encode()).decode())
            else:
                report.external.append(url)
                self._send("Fetch.failRequest", session, requestId=params["requestId"],
                           errorReason="BlockedByClient")

    # --- what a test calls ------------------------------------------------------------------------------

    def check(self, url: str, settle: float = 0.5) -> PageReport:
        """Load ``url`` in a fresh tab, wait for its load event, and report what the page shows."""
        self._report = report = PageReport(url)
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        try:
            for domain in ("Page", "Runtime", "Log"):
                self._call(f"{domain}.enable", session)
            self._call("Fetch.enable", session, patterns=[{"urlPattern": "http*://*"}])
            self._call("Page.navigate", session, url=url)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                if self._receive().get("method") == "Page.loadEventFired":
                    break
            else:
                report.errors.append(f"no load event within {self.timeout} s")
            end = time.monotonic() + settle  # late errors: scripts that run after load
            self._ws.settimeout(settle)
            try:
                while time.monotonic() < end:
                    self._receive()
            except websocket.WebSocketTimeoutException:
                pass
            finally:
                self._ws.settimeout(self.timeout)
            result = self._call("Runtime.evaluate", session, expression=INSPECT, returnByValue=True)
            seen = json.loads(result["result"]["value"])
            report.title, report.h1 = seen["title"], seen["h1"]
            report.images, report.links, report.details = seen["images"], seen["links"], seen["details"]
        finally:
            self._call("Target.closeTarget", targetId=target)
        return report
