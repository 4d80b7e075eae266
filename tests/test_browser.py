"""The service's page (``GET /``) in a real headless Chromium, against the live service.

Chromium is driven over the DevTools protocol (a local websocket; nothing leaves the machine):
the page loads and shows the model, loads a held-out example, solves it, steps through the
supervision steps (each step's grid and changed-cell count must equal what ``POST /v1/solve``
with ``trace`` returns for the same puzzle), and shows the service's error for a malformed grid
and its own for text that is not JSON. Debian's ``chromium`` is needed (``.ci/run`` installs it).

``TRM_PAGE_SCREENSHOT=PATH`` also writes a screenshot at step 3 to PATH, and ``TRM_PAGE_RUN=DIR``
serves that run instead of the 6-step test run (how docs/service_page.png is made).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websocket

from test_serve import LiveServer, tiny_run  # noqa: F401  (tiny_run: the shared 6-step run)
from trm.serve import build_service

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("No Chromium found (looked for " + ", ".join(BROWSERS) + "). Install Debian's: "
                         "`apt-get install -y chromium` (.ci/run does this before the tests).")


class Browser:
    """One headless Chromium and a DevTools-protocol session on its first page."""

    def __init__(self, profile: Path, width: int = 1360, height: int = 860):
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [find_browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None, f"chromium exited with {self.proc.returncode} before listening"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port within 60 s"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as reply:
            pages = [t for t in json.load(reply) if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method: str, **params):
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"the page never satisfied {expression!r} within {timeout} s"
            time.sleep(0.05)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, element_id: str) -> None:
        self.eval(f"document.getElementById({element_id!r}).click()")

    def set_value(self, element_id: str, value: str) -> None:
        self.eval(f"(() => {{ const e = document.getElementById({element_id!r}); e.value = {json.dumps(value)}; "
                  f"e.dispatchEvent(new Event('input')); }})()")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def changed_cells(before, after) -> int:
    """Cells of ``after`` that differ from ``before`` (the page's highlighting rule)."""
    rows_before = [list(r) for r in before]
    return sum(1 for r, row in enumerate(after) for c, cell in enumerate(row)
               if not (r < len(rows_before) and c < len(rows_before[r]) and rows_before[r][c] == cell))


PREDICTED_GRID = ("Array.from(document.querySelectorAll('#predView tr'), tr => Array.from(tr.cells, "
                  "td => td.textContent === '' ? 0 : Number(td.textContent)))")


@pytest.fixture(scope="module")
def page_server(request):
    run = os.environ.get("TRM_PAGE_RUN") or request.getfixturevalue("tiny_run")
    live = LiveServer(build_service(run, poll_seconds=30, max_batch=8, batch_wait_ms=5))
    yield live
    live.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = Browser(tmp_path_factory.mktemp("chromium") / "profile")
    yield chromium
    chromium.close()


def test_page_loads_solves_steps_and_shows_errors(page_server, browser, tmp_path):
    model = page_server.service.slot.current
    browser.goto(page_server.url + "/")
    browser.wait_for("document.readyState === 'complete' && document.body.dataset.ready === '1'")
    header = browser.eval("document.getElementById('model').textContent")
    assert f"checkpoint step {model.step}" in header and "sudoku" in header, header
    assert browser.eval("document.getElementById('task').value") == "sudoku"

    # load a held-out example
    index = 2
    browser.set_value("index", str(index))
    browser.click("load")
    browser.wait_for("document.getElementById('status').textContent.includes('loaded')")
    with page_server.client() as c:
        example = c.get(f"/v1/examples/{index}").json()
    assert json.loads(browser.eval("document.getElementById('grid').value")) == example["grid"]
    assert browser.eval("document.querySelectorAll('#inputView td').length") == 81
    assert browser.eval("document.getElementById('error').classList.contains('shown')") is False

    # solve: the page shows the last step of the same trace the API returns
    browser.click("solve")
    browser.wait_for("document.getElementById('status').textContent.startsWith('solved')")
    with page_server.client() as c:
        reply = c.post("/v1/solve", json={"task": "sudoku", "grid": example["grid"], "puzzle_id": example["puzzle_id"],
                                          "trace": True}).json()
    trace = reply["trace"]
    n = len(trace)
    assert n == reply["supervision_steps"] >= 2
    assert browser.eval("document.getElementById('stepLabel').textContent") == f"step {n} of {n}"
    assert browser.eval(PREDICTED_GRID) == reply["grid"] == trace[-1]["grid"]
    shot = browser.screenshot()
    assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 10_000
    (tmp_path / "page.png").write_bytes(shot)

    # step back through the trace: each step's grid, changed cells and halting confidence
    for k in range(n, 0, -1):
        if k < n:
            browser.click("prev")
        assert browser.eval("document.getElementById('stepLabel').textContent") == f"step {k} of {n}"
        assert browser.eval(PREDICTED_GRID) == trace[k - 1]["grid"]
        previous = trace[k - 2]["grid"] if k > 1 else example["grid"]
        shown = int(browser.eval("document.getElementById('stepInfo').dataset.changed"))
        assert shown == changed_cells(previous, trace[k - 1]["grid"])
        assert browser.eval("document.querySelectorAll('#predView td.changed').length") == shown
        info = browser.eval("document.getElementById('stepInfo').textContent")
        assert f"halting confidence {trace[k - 1]['halting_confidence']:.3f}" in info, info
        if k == min(n, 3) and os.environ.get("TRM_PAGE_SCREENSHOT"):
            Path(os.environ["TRM_PAGE_SCREENSHOT"]).write_bytes(browser.screenshot())
    assert browser.eval("document.getElementById('prev').disabled") is True
    browser.click("last")
    assert browser.eval("document.getElementById('stepLabel').textContent") == f"step {n} of {n}"

    # a malformed grid: the service's 422 message is shown, the last trace stays
    malformed = [[1, 2, 3], [4, 5, 6]]
    browser.set_value("grid", json.dumps(malformed))
    browser.click("solve")
    shown = browser.wait_for("document.getElementById('error').classList.contains('shown') && "
                             "document.getElementById('error').textContent")
    with page_server.client() as c:
        expected = c.post("/v1/solve", json={"task": "sudoku", "grid": malformed, "trace": True})
    assert expected.status_code == 422 and shown == expected.json()["error"]["message"]
    assert browser.eval("document.getElementById('stepLabel').textContent") == f"step {n} of {n}"

    # text that is not JSON: the page's own message; a good solve clears the error
    browser.set_value("grid", "[[1, 2")
    browser.click("solve")
    assert "not valid JSON" in browser.wait_for("document.getElementById('error').textContent")
    browser.set_value("grid", json.dumps(example["grid"]))
    browser.click("solve")
    browser.wait_for("!document.getElementById('error').classList.contains('shown') && "
                     "document.getElementById('status').textContent.startsWith('solved')")
