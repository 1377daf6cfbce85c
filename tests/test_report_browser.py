"""The HTML report in a real browser: headless Chromium renders it, every embedded plot
decodes (naturalWidth > 0) and a screenshot is saved. Skips only when no Chromium exists."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

import bnkit
from bnkit.lab import config, runner

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
# Runs after the load event: records each <img>'s decoded width on <body>.
PROBE = ("<script>window.addEventListener('load', function () {"
         "var w = []; document.querySelectorAll('img').forEach(function (i) {"
         "w.push(i.complete ? i.naturalWidth : -1); });"
         "document.body.setAttribute('data-img-widths', w.join(','));});</script>")


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium found (install Debian's `chromium`; .ci/run does when root)")


def _run(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args],
                          check=False, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HOME": str(tmp_path)})


@pytest.fixture(scope="module")
def report_html(tiny_idx_dir, tmp_path_factory):
    """report.html of a mini run with two experiments (two embedded plots)."""
    previous = bnkit.get_backend()
    bnkit.set_backend("reference")
    try:
        cfg = config.resolve(["init", "inference"], "mini", data=str(tiny_idx_dir))
        res = runner.run_lab(cfg, tmp_path_factory.mktemp("lab") / "run", progress=False,
                             strict=True)
    finally:
        bnkit.set_backend(previous)
    return res.report_html


def test_every_image_of_the_report_loads_in_chromium(report_html, tmp_path):
    browser = _browser()
    page = tmp_path / "probe.html"
    text = report_html.read_text()
    n_images = text.count("<img ")
    assert n_images == 2
    page.write_text(text.replace("</body>", PROBE + "</body>"))
    done = _run(browser, tmp_path, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'data-img-widths="([^"]*)"', done.stdout)
    assert found, "the probe script did not run: " + done.stdout[:500]
    widths = [int(w) for w in found.group(1).split(",")]
    assert len(widths) == n_images and all(w > 100 for w in widths), widths
    assert "bnkit lab report" in done.stdout and "Summary" in done.stdout


def test_screenshot_of_the_report(report_html, tmp_path):
    from matplotlib.image import imread

    browser = _browser()
    shot = tmp_path / "report.png"
    done = _run(browser, tmp_path, "--window-size=1200,1800", f"--screenshot={shot}",
                report_html.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = imread(shot)
    assert pixels.shape[:2] == (1800, 1200)
    assert pixels.std() > 0.05  # not a blank page: text, tables and plots drawn
