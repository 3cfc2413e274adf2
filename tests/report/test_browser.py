"""The HTML report in a real browser: headless Chromium loads a --quick merge report.

The page is served from the run folder over http on 127.0.0.1 (as a reader would open it
through any static server) and driven with Playwright's Python package against the system
Chromium (Debian's ``chromium``; ``playwright install`` is never run, so nothing is downloaded).
The checks: no console error, page error, failed request or HTTP error; every ``<img>`` loaded
with a non-zero natural size; every ``<video>`` reaches HAVE_FUTURE_DATA, plays (currentTime
advances, not paused) and has no media error; a full-page screenshot is saved.

The test is skipped, with the reason and the install command, only when the browser or the
Python driver is missing. ``DRIVEPRIV_CHROMIUM`` names the browser binary (default: ``chromium``
on PATH); ``DRIVEPRIV_SCREENSHOT_DIR``, when set, receives a copy of the screenshot.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BROWSER_ENV = "DRIVEPRIV_CHROMIUM"
SCREENSHOT_ENV = "DRIVEPRIV_SCREENSHOT_DIR"
BROWSER_INSTALL = "apt-get update && apt-get install -y chromium"
DRIVER_INSTALL = 'pip install -e ".[dev]"  (or: pip install playwright==1.65.2; no `playwright install` needed)'

LAUNCH_TIMEOUT_MS = 30_000
STEP_TIMEOUT_MS = 10_000
PLAY_S = 0.5  # the video must advance this far (or to half its length) after play()


def find_chromium() -> str | None:
    """The Chromium binary to drive: ``$DRIVEPRIV_CHROMIUM`` if set, else chromium on PATH."""
    explicit = os.environ.get(BROWSER_ENV)
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium via Playwright; skips only when the browser or the driver is missing."""
    missing = []
    exe = find_chromium()
    if exe is None:
        where = f"{BROWSER_ENV}={os.environ[BROWSER_ENV]!r}" if os.environ.get(BROWSER_ENV) else "`chromium` on PATH"
        missing.append(f"no Chromium ({where}); install it with: {BROWSER_INSTALL}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append(f"no Python package playwright; install it with: {DRIVER_INSTALL}")
    if missing:
        pytest.skip("browser test of report.html skipped: " + "; ".join(missing))

    pw = sync_playwright().start()
    try:
        # --disable-dev-shm-usage: containers often have a small /dev/shm, where Chromium crashes.
        b = pw.chromium.launch(executable_path=exe, headless=True, args=["--disable-dev-shm-usage"], timeout=LAUNCH_TIMEOUT_MS)
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from the run folder; quiet; an empty favicon.

    Chromium asks every http origin for /favicon.ico on its own; that request is the browser's,
    not the report's, and its 404 would otherwise show up as a console error.
    """

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] == "/favicon.ico":
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def served_report(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A --quick merge report written through the real command line, served on 127.0.0.1.

    Yields the base URL and the run folder.
    """
    from drivepriv.cli import main

    out = tmp_path_factory.mktemp("browser-report")
    # one process: the page is under test here, not the fan-out (tests/test_parallel covers it);
    # forked from the long test session, a worker of the pool died twice in .ci/run (2026-12-07)
    assert main(["eval", "--scenario", "merge", "--quick", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    pages = sorted(out.glob("merge/*/report.html"))
    assert len(pages) == 1, f"expected one report under {out}/merge, found {pages}"
    run_dir = pages[0].parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(run_dir)))
    thread = threading.Thread(target=server.serve_forever, name="report-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", run_dir
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class PageCheck:
    """What the browser saw: every problem found, and the images and videos inspected."""

    problems: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)


_VIDEO_STATE = """v => ({src: v.currentSrc, readyState: v.readyState, networkState: v.networkState,
  paused: v.paused, ended: v.ended, currentTime: v.currentTime, duration: v.duration,
  videoWidth: v.videoWidth, videoHeight: v.videoHeight,
  error: v.error ? `code ${v.error.code}: ${v.error.message}`
    : v.networkState === 3 && v.readyState === 0 ? "NETWORK_NO_SOURCE: no <source> could be played" : null})"""

# A media error, or (with <source> children, which leave v.error null) no usable source at all.
_VIDEO_FAILED = "(v.error || (v.networkState === 3 && v.readyState === 0))"


def check_page(browser, url: str, screenshot: Path) -> PageCheck:
    """Open ``url``, load every image, play every video, save a full-page screenshot."""
    from playwright.sync_api import Error as PlaywrightError

    result = PageCheck()
    problems = result.problems
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text} ({m.location.get('url', '')})"))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}: {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))

        response = page.goto(url, wait_until="load", timeout=STEP_TIMEOUT_MS)
        assert response is not None and response.ok, f"{url}: {response and response.status}"

        # Images: the report marks them loading="lazy", so bring each into view first.
        images = page.locator("img")
        for i in range(images.count()):
            images.nth(i).scroll_into_view_if_needed()
        try:
            page.wait_for_function("[...document.images].every(i => i.complete)", timeout=STEP_TIMEOUT_MS)
        except PlaywrightError as e:
            problems.append(f"images still loading after {STEP_TIMEOUT_MS} ms: {e}")
        result.images = page.evaluate(
            "[...document.images].map(i => ({src: i.currentSrc || i.src, complete: i.complete,"
            " naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}))"
        )
        for img in result.images:
            if not (img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0):
                problems.append(f"image did not load: {img}")

        # Videos: metadata (what preload="metadata" asks for), then play() to HAVE_FUTURE_DATA and beyond.
        for handle in page.query_selector_all("video"):
            handle.scroll_into_view_if_needed()
            try:
                page.wait_for_function(f"v => {_VIDEO_FAILED} || v.readyState >= 1", arg=handle, timeout=STEP_TIMEOUT_MS)
                if not handle.evaluate(f"v => !!{_VIDEO_FAILED}"):
                    handle.evaluate("v => v.play()")  # muted in the page, so headless autoplay allows it
                    page.wait_for_function(
                        f"v => {_VIDEO_FAILED} || (v.readyState >= 3 && !v.paused && v.currentTime >= Math.min({PLAY_S}, v.duration / 2))",
                        arg=handle,
                        timeout=STEP_TIMEOUT_MS,
                    )
            except PlaywrightError as e:
                problems.append(f"video did not play: {handle.evaluate(_VIDEO_STATE)}: {e}")
            state = handle.evaluate(_VIDEO_STATE)
            result.videos.append(state)
            if state["error"] or state["readyState"] < 3 or state["currentTime"] <= 0 or (state["paused"] and not state["ended"]):
                problems.append(f"video not playing: {state}")
            elif not state["videoWidth"]:
                problems.append(f"video has no picture: {state}")

        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(screenshot), full_page=True, timeout=STEP_TIMEOUT_MS)
    finally:
        context.close()
    return result


def assert_real_png(path: Path) -> tuple[int, int]:
    """A PNG with real content (not blank); returns its size in pixels."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) > 20_000, f"{path}: only {len(data)} bytes"
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 100, f"{path}: only {len(colours)} colours, the page looks blank"
        return rgb.size


def test_report_page_in_chromium(browser, served_report, tmp_path):
    """report.html loads cleanly, shows every image, plays its video; the screenshot is kept."""
    base_url, run_dir = served_report
    shot = tmp_path / "report.png"
    seen = check_page(browser, f"{base_url}/report.html", shot)

    assert not seen.problems, "report.html in Chromium:\n" + "\n".join(seen.problems)
    assert seen.images, "the report shows no image"
    assert len(seen.images) == len(list(run_dir.glob("figures/*.png")))
    assert len(seen.videos) == len(list(run_dir.glob("videos/*.mp4"))) >= 1
    width, height = assert_real_png(shot)
    assert width == 1280 and height > 900  # full page, taller than the viewport

    if os.environ.get(SCREENSHOT_ENV):
        keep = Path(os.environ[SCREENSHOT_ENV])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep / "report.png")


def test_checks_catch_a_broken_page(browser, served_report, tmp_path):
    """The checks above are not vacuous: a copy with a missing image, a video that is not a
    video and a script error is reported on each count."""
    base_url, run_dir = served_report
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    first_png = next(run_dir.glob("figures/*.png")).name
    first_mp4 = next(run_dir.glob("videos/*.mp4")).name
    assert f'src="figures/{first_png}"' in html and f'src="videos/{first_mp4}"' in html
    broken = (
        html.replace(f'src="figures/{first_png}"', 'src="figures/missing.png"', 1)
        .replace(f'src="videos/{first_mp4}"', f'src="figures/{first_png}"', 1)
        .replace("</body>", "<script>console.error('injected'); undefinedFunction();</script></body>", 1)
    )
    (run_dir / "broken.html").write_text(broken, encoding="utf-8")
    try:
        seen = check_page(browser, f"{base_url}/broken.html", tmp_path / "broken.png")
    finally:
        (run_dir / "broken.html").unlink()

    text = "\n".join(seen.problems)
    assert "console error: injected" in text, text
    assert "page error:" in text and "undefinedFunction" in text, text
    assert "HTTP 404:" in text and "missing.png" in text, text
    assert "image did not load:" in text and "missing.png" in text, text
    assert "video not playing:" in text and "NETWORK_NO_SOURCE" in text, text
