"""The built site in a real browser: headless Chromium opens the overview from disk (file://), the table
has the expected rows with their intervals and "tied for first" marks, clicking a header sorts it, there are no
console errors, and a screenshot is saved.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL on file descriptors 3 and 4), so no network port and no extra Python package is needed.
In CI (``CI=true``) a missing Chromium is a failure, not a skip (`.ci/run` installs Debian's ``chromium``).
Screenshots go to ``$EVALSUITE_TEST_ARTIFACTS`` (default: the test's tmp dir).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from evalsuite.results import Result, append_results
from leaderboard.site import build_site

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDP:
    """Minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, binary: str, user_data_dir: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def child_fds():  # Chromium reads commands on fd 3 and writes replies on fd 4
            a, b = os.dup(cmd_r), os.dup(res_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=child_fds, close_fds=False)
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from Chromium")
            ready, _, _ = select.select([self._res_r], [], [], left)
            if ready:
                chunk = os.read(self._res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the debugging pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for i, m in enumerate(self.events):
            if m.get("method") == method:
                return self.events.pop(i)
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._res_r)


@pytest.fixture()
def chromium() -> str:
    path = chromium_binary()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is required in CI (install Debian's `chromium`; .ci/run does)")
        pytest.skip("Chromium not installed (the test runs in CI)")
    return path


def _site(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    runs.mkdir()
    best = {"supervised": 88.5, "jigsaw": 67.25, "rotnet": 71.0, "<i>evil</i>": 12.0}
    # bootstrap intervals (value ± half-width): rotnet's [62, 80] overlaps supervised's [79.5, 97.5], so the two
    # are tied for first; jigsaw's and evil's do not reach it
    half = {"supervised": 9.0, "jigsaw": 2.0, "rotnet": 9.0, "<i>evil</i>": 2.0}
    recs = []
    for i, (method, top) in enumerate(best.items()):
        for j, layer in enumerate(["conv1", "res2", "res3", "res4", "res5"]):
            v = top - 4 * (4 - j)
            recs.append(Result(task="voc07_svm", dataset="voc2007", split="test", layer=layer, metric="mAP",
                               value=v, checkpoint_id=str(i) * 64, checkpoint=f"{method}.pth",
                               method=method, arch="resnet50", pretrain_data="imagenet1k", protocol="goyal19",
                               params={"costs": [1, 10]}, created="2024-01-01T00:00:00Z", ci_low=v - half[method],
                               ci_high=v + half[method], ci_level=0.95))
    # rotnet has no places205 number: an empty cell that must sort last
    for method, v in (("supervised", 50.5), ("jigsaw", 40.25), ("<i>evil</i>", 60.0)):
        i = list(best).index(method)
        recs.append(Result(task="places205_linear", dataset="places205", split="val", layer="res4", metric="top1",
                           value=v, checkpoint_id=str(i) * 64, checkpoint=f"{method}.pth", method=method,
                           arch="resnet50", pretrain_data="imagenet1k", protocol="goyal19", params={"lr": 0.01},
                           created="2024-01-01T00:00:00Z"))
    append_results(runs / "results.jsonl", recs)
    build_site([runs], tmp_path / "site")
    return tmp_path / "site" / "index.html"


JS_ROWS = ("JSON.stringify(Array.from(document.querySelectorAll('#overview-table tbody tr'))"
           ".map(r => Array.from(r.cells).map(c => c.innerText.trim().replace(/\\s+/g, ' '))))")
JS_HEAD = ("JSON.stringify(Array.from(document.querySelectorAll('#overview-table thead th'))"
           ".map(c => c.innerText.trim().replace(/\\s+/g, ' ')))")


def test_overview_renders_sorts_and_has_no_console_errors(tmp_path, chromium) -> None:
    index = _site(tmp_path)
    cdp = CDP(chromium, tmp_path / "profile")
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            cdp.send(f"{domain}.enable", session=session)
        cdp.send("Page.navigate", {"url": index.resolve().as_uri()}, session=session)
        cdp.wait_event("Page.loadEventFired")

        def evaluate(expr: str):
            r = cdp.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
            if "exceptionDetails" in r:
                raise AssertionError(r["exceptionDetails"])
            value = r["result"].get("value")
            return json.loads(value) if expr.startswith("JSON.stringify") else value

        head = evaluate(JS_HEAD)
        rows = evaluate(JS_ROWS)
        assert head[:2] == ["checkpoint", "protocol"]
        pl = head.index("places205_linear top1")
        voc = head.index("voc07_svm mAP")
        labels = [r[0] for r in rows]
        assert sorted(labels) == sorted(f"{m} / resnet50 / imagenet1k" for m in
                                        ("supervised", "jigsaw", "rotnet", "<i>evil</i>"))
        assert evaluate("document.querySelectorAll('#overview-table i').length") == 0  # escaped, not markup

        # click the VOC column: numbers descending (best first), then ascending on a second click
        evaluate(f"document.querySelectorAll('#overview-table thead th')[{voc}].click()")
        rows = evaluate(JS_ROWS)
        assert [r[voc] for r in rows] == ["88.50 ± 9.00 res5 1st", "71.00 ± 9.00 res5 =1st", "67.25 ± 2.00 res5",
                                          "12.00 ± 2.00 res5"]
        # the bracket is drawn (the stylesheet's marks), the interval's bounds are on hover
        assert evaluate("document.querySelectorAll('#overview-table td.tied-first').length") == 2
        assert evaluate("getComputedStyle(document.querySelector('#overview-table span.tie')).backgroundColor") \
            == "rgb(31, 111, 58)"
        assert evaluate("document.querySelector('#overview-table td.tied-first small.ci').title") == \
            "95% bootstrap interval over the test samples: [79.500, 97.500]"
        assert evaluate(f"document.querySelectorAll('#overview-table thead th')[{voc}].getAttribute('aria-sort')") \
            == "descending"
        evaluate(f"document.querySelectorAll('#overview-table thead th')[{voc}].click()")
        assert [r[voc] for r in evaluate(JS_ROWS)] == ["12.00 ± 2.00 res5", "67.25 ± 2.00 res5",
                                                       "71.00 ± 9.00 res5 =1st", "88.50 ± 9.00 res5 1st"]
        # a column with a missing value: the empty cell goes last in both directions
        evaluate(f"document.querySelectorAll('#overview-table thead th')[{pl}].click()")
        assert [r[pl] for r in evaluate(JS_ROWS)] == ["60.00 res4", "50.50 res4", "40.25 res4", "–"]
        evaluate(f"document.querySelectorAll('#overview-table thead th')[{pl}].click()")
        assert [r[pl] for r in evaluate(JS_ROWS)] == ["40.25 res4", "50.50 res4", "60.00 res4", "–"]
        # text column sorts alphabetically
        evaluate("document.querySelectorAll('#overview-table thead th')[0].click()")
        assert [r[0] for r in evaluate(JS_ROWS)] == sorted(labels, key=lambda s: s.lower())
        # the published table is there, and the stylesheet loaded from disk
        assert evaluate("document.querySelectorAll('#published-table tbody tr').length") > 0
        assert evaluate("getComputedStyle(document.querySelector('th')).cursor") == "pointer"

        shot = cdp.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        png = base64.b64decode(shot)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        out = Path(os.environ.get("EVALSUITE_TEST_ARTIFACTS") or tmp_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "leaderboard_overview.png").write_bytes(png)

        errors = [e for e in cdp.events if
                  e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert errors == [], errors
    finally:
        cdp.close()


def test_task_page_renders_its_plot(tmp_path, chromium) -> None:
    index = _site(tmp_path)
    page = next((index.parent / "tasks").glob("voc07-svm-*.html"))
    dom = subprocess.run([chromium, *[f for f in FLAGS if f != "--remote-debugging-pipe"],
                          f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "<table" in dom and "88.50" in dom and 'src="../plots/' in dom
    assert "[79.50, 97.50]" in dom  # supervised's res5 interval beside its number
    svg = (index.parent / "plots" / dom.split('src="../plots/')[1].split('"')[0]).read_text()
    assert 'id="LineCollection_1"' in svg  # the per-layer plot's error bars


def test_transfer_table_renders(tmp_path, chromium) -> None:
    """linear_transfer records of three checkpoints: the index has the checkpoints x datasets table with the mean and
    the average rank (best first), and the overview shows only the summary mean of the task."""
    runs = tmp_path / "runs"
    runs.mkdir()
    recs = []
    for i, (method, cifar, dtd) in enumerate((("supervised", 90.0, 70.0), ("jigsaw", 60.0, 40.0),
                                              ("rotnet", 95.0, 20.0))):
        mean = (cifar + dtd) / 2
        for dataset, metric, v in (("cifar10", "top1", cifar), ("dtd", "top1", dtd), ("all", "mean", mean)):
            recs.append(Result(task="linear_transfer", dataset=dataset, split="test", layer="res5", metric=metric,
                               value=v, checkpoint_id=str(i) * 64, checkpoint=f"{method}.pth", method=method,
                               arch="resnet50", pretrain_data="imagenet1k", protocol="ericsson21", params={},
                               created="2024-01-01T00:00:00Z"))
    append_results(runs / "results.jsonl", recs)
    build_site([runs], tmp_path / "site")
    dom = subprocess.run([chromium, *[f for f in FLAGS if f != "--remote-debugging-pipe"],
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          (tmp_path / "site" / "index.html").resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    table = dom.split('class="sortable transfer"')[1].split("</table>")[0]
    rows = table.split("<tbody>")[1].split("<tr>")[1:]
    cells = [[c.split(">", 1)[1].split("<")[0].strip() for c in r.split("<td")[4:]] for r in rows]
    # per column ranks: cifar10 rotnet 1, supervised 2, jigsaw 3; dtd supervised 1, jigsaw 2, rotnet 3
    assert cells == [["90.00", "70.00", "80.00", "1.50"], ["95.00", "20.00", "57.50", "2.00"],
                     ["60.00", "40.00", "50.00", "2.50"]]
    assert [r.split('title="')[1].split(".pth")[0] for r in rows] == ["supervised", "rotnet", "jigsaw"]
    overview = dom.split('id="overview-table"')[1].split("</thead>")[0]
    assert "linear_transfer" in overview and "cifar10" not in overview  # the summary column only
