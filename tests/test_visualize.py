"""scripts/visualize.py serves an export's graph in Model Explorer; headless Chromium (Debian's
``chromium``, driven through Playwright) loads the page and the graph renders: the page names
the model and its node count (the graph's own, from the server), and the screenshot is not
blank. Nothing leaves the machine: the browser resolves no host but localhost, and the
server's version check goes to a closed local port."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # WebGL in software (the graph is drawn with WebGL; there is no GPU here).
    "--enable-unsafe-swiftshader",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(exported, tmp_path: Path):
    """``served(model, source) -> (url, port)``: scripts/visualize.py running on a free port;
    stopped after the test."""
    procs: list[subprocess.Popen] = []

    def start(model: str, source: str) -> tuple[str, int]:
        port = _free_port()
        log = tmp_path / f"visualize-{source}.log"
        closed = "http://127.0.0.1:9"  # nothing listens there: the version check fails at once
        env = {**os.environ, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "NO_PROXY": "localhost"}
        cmd = [sys.executable, "scripts/visualize.py", str(exported(model)), "--source", source,
               "--port", str(port), "--no-browser"]  # fmt: skip
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            match = re.search(rf"http://localhost:{port}/\?data=\S+", log.read_text())
            if match:
                return match[0], port
            assert procs[-1].poll() is None, log.read_text()
            time.sleep(0.5)
        raise AssertionError(f"Model Explorer did not start in 180 s:\n{log.read_text()}")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="make test installs chromium (make system-packages)")
@pytest.mark.parametrize("source", ["exported_program", "onnx"])
def test_model_explorer_renders_the_export(served, tmp_path: Path, source: str) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    url, port = served("mlp", source)
    graphs = None
    if source == "exported_program":  # converted at start; the ONNX file is read on request
        api = f"http://localhost:{port}/api/v1/load_graphs_json?graph_index=0"
        with urllib.request.urlopen(api, timeout=60) as response:
            graphs = json.loads(response.read())
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user data dir
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.goto(url)
            # The graph view shows "<n> nodes" beside the model's name once it has rendered.
            page.wait_for_function(
                "document.body.innerText.match(/\\d+ nodes/)", timeout=180_000, polling=500
            )
            text = page.inner_text("body")
            shot = tmp_path / "graph.png"
            page.locator("canvas").first.screenshot(path=str(shot))  # the graph's WebGL canvas
        finally:
            browser.close()
    name = "program.pt2" if source == "exported_program" else "model.onnx"
    assert name in text, text[:2000]
    n_nodes = int(re.search(r"(\d+) nodes", text)[1])
    assert n_nodes > 10
    if graphs is not None:  # the count is the graph's, as the server converted it
        assert n_nodes == len(graphs["graphs"][0]["nodes"])
    # Not blank: the drawn nodes, edges and labels give many colours and a few percent of the
    # canvas that is not background (a canvas that failed to draw is one colour).
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 22)
    background = max(colors)[0]
    assert len(colors) > 20, "the graph canvas is blank"
    assert background < 0.99 * image.width * image.height, "the graph canvas is nearly blank"
