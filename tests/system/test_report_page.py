"""The report page as a person sees it: rendered by a real headless browser (Debian's
chromium), checked on its screenshot's pixels, on its printed text (pdftotext) and on the DOM
after its script ran.  Data: the recorded nights and the failed smoke run of
tests/data/reports (see its README).  Boots no guest.

The screenshots are kept: in ``$HARNESS_TEST_ARTIFACTS`` when set (CI uploads that folder),
else in the test's pytest tmp dir (pytest keeps the last three runs' dirs); each test prints
where.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.report.page import GUEST_COLOUR, HOST_COLOUR, OUTCOME_COLOURS

DATA = Path(__file__).resolve().parents[1] / "data" / "reports"
N1, N2 = DATA / "night-1.merged.json", DATA / "night-2.merged.json"
FAILED = DATA / "smoke-every-queue.json"
CHROMIUM = shutil.which("chromium")
PDFTOTEXT = shutil.which("pdftotext")

needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium (a headless browser) is not installed: "
    "the page cannot be rendered (ci/setup installs it)")


def artifacts(tmp_path: Path) -> Path:
    where = os.environ.get("HARNESS_TEST_ARTIFACTS")
    folder = Path(where) if where else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
         # Nothing may be fetched: every host name resolves to nowhere.
         "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=3000", *args],
        capture_output=True, text=True, timeout=180, check=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tonight (night-2 plus the failed smoke run) against last night (night-1)."""
    folder = tmp_path_factory.mktemp("page")
    tonight = folder / "tonight"
    tonight.mkdir()
    shutil.copy(FAILED, tonight / "report.json")
    html = folder / "report.html"
    started = time.monotonic()
    code = main(["report", "page", str(N2), str(tonight), "--against", str(N1),
                 "--html", str(html), "--title", "nightly"])
    print(f"page: {html.stat().st_size} bytes, written in {time.monotonic() - started:.2f} s")
    assert code == 1  # a failed run and a regression
    return html


def colour_pixels(png: Path, colour: str, tolerance: int = 4) -> int:
    import numpy as np
    from PIL import Image

    want = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    with Image.open(png) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(pixels - want) <= tolerance).all(axis=2).sum())


def test_the_page_needs_nothing_but_itself(page: Path) -> None:
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and not re.search(r"url\((?!#)", text)  # #: in the page
    assert text.count("<svg") >= 2  # the counts of the failed run, the latency plot


@needs_browser
def test_screenshot_shows_the_verdict_and_the_plots(page: Path, tmp_path: Path) -> None:
    out = artifacts(tmp_path)
    shot = out / "report-page.png"
    started = time.monotonic()
    browser(tmp_path, f"--screenshot={shot}", "--window-size=1280,2200", page.as_uri())
    print(f"screenshot {shot} in {time.monotonic() - started:.2f} s")
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 2200)
        # The header bar is in the colour of failure, edge to edge.
        assert img.convert("RGB").getpixel((5, 5)) == tuple(
            int(OUTCOME_COLOURS["fail"][i:i + 2], 16) for i in (1, 3, 5))
    # The guest-count bars of the failed run's plot are drawn (its evidence is open).
    assert colour_pixels(shot, GUEST_COLOUR) > 2000


@needs_browser
def test_one_click_opens_a_runs_evidence_and_its_host_counts(page: Path,
                                                             tmp_path: Path) -> None:
    """A link to a passing run (closed by default) opens it: its plot shows the host's
    counts beside the guest's."""
    html = page.read_text()
    target = re.search(r'<section class="run" id="(run-e0d10ba2[^"]*)">', html)
    assert target, "the x86 lab's irqfd run has a section"
    assert f'href="#{target.group(1)}"' in html  # the matrix links to it
    out = artifacts(tmp_path)
    closed, opened = out / "report-page-closed.png", out / "report-page-run-opened.png"
    # A window taller than the page: headless chromium's screenshot of a scrolled page is
    # blank, so the link opens the run without scrolling.
    browser(tmp_path, f"--screenshot={closed}", "--window-size=1280,6000", page.as_uri())
    browser(tmp_path, f"--screenshot={opened}", "--window-size=1280,6000",
            f"{page.as_uri()}#{target.group(1)}")
    print(f"screenshots {closed} and {opened}")
    assert colour_pixels(opened, HOST_COLOUR) > 1500  # the host's bars of that run
    assert colour_pixels(closed, HOST_COLOUR) < colour_pixels(opened, HOST_COLOUR) / 4
    dom = browser(tmp_path, "--dump-dom", f"{page.as_uri()}#{target.group(1)}").stdout
    section = dom[dom.index(f'id="{target.group(1)}"'):]
    assert section.split(">", 1)[1].lstrip().startswith("<details open")


@pytest.mark.skipif(PDFTOTEXT is None, reason="poppler-utils' pdftotext is not installed: "
                    "the printed page cannot be read back (ci/setup installs it)")
@needs_browser
def test_the_printed_page_shows_the_failing_evidence_and_the_regression(page: Path,
                                                                        tmp_path: Path
                                                                        ) -> None:
    pdf = artifacts(tmp_path) / "report-page.pdf"
    browser(tmp_path, f"--print-to-pdf={pdf}", "--no-pdf-header-footer", page.as_uri())
    assert PDFTOTEXT is not None
    text = subprocess.run([PDFTOTEXT, "-layout", str(pdf), "-"], capture_output=True,
                          text=True, timeout=60, check=True).stdout
    flat = " ".join(text.split())
    assert "nightly: FAILED" in flat and "2 regression(s) since the last night" in flat
    # The diff, the changed path first, then the run that is new tonight and failed.
    diff = flat[flat.index("Since the last night"):]
    assert diff.index("l2/nic#1 posted -> irqfd-bounce") < diff.index("NEW FAIL")
    # ...and the matrix marks the vector that changed.
    assert "l2/nic#1 irqfd-bounce (changed)" in flat
    # The failed expectation's evidence is open: its message, the table of the vectors it
    # judged with their numbers and reasons, and the console tail.
    assert "guest0/disk0 expects emulated: virtio1-req.0: 0 interrupts < 10" in flat
    assert re.search(r"guest0/disk0#1 .*virtio1-req\.0 .*not-delivered", flat)
    assert "console of guest0 (last lines)" in flat
    # A passing run's evidence stays folded: one click away, not in the way.
    assert "l2/nic#1 0000:00:04.0" not in flat
    assert "Latency per delivery path" in flat and "ping round trip" in flat
