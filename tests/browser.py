"""A real browser for the UIs: Debian's Chromium, headless, driven by Playwright.

`open_page(url, wait_for)` loads a page (a single-page app's hash route included) and waits until
a CSS selector appears in it, as a user waits for the page to draw, then hands the page over for
reading its DOM and taking screenshots. The browser is the system's Chromium (`.ci/run` installs
Debian's `chromium`), never a download: Playwright's own browsers are not fetched.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# MLflow's charts render only once scrolled into view: a tall window shows them all
VIEWPORT = {"width": 1400, "height": 2400}


@contextmanager
def open_page(url: str, wait_for: str, timeout_s: float = 90) -> Iterator:
    """The Playwright page at `url` once `wait_for` (a CSS selector) is in it; TimeoutError naming both if never."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            try:
                page.wait_for_selector(wait_for, timeout=timeout_s * 1000)
            except PlaywrightTimeout as error:
                raise TimeoutError(f"{url} showed no {wait_for!r} within {timeout_s:.0f}s") from error
            yield page
        finally:
            browser.close()
