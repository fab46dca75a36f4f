"""Headless Chromium (Debian's package) driven by Playwright, against a real box.

Browsers cannot be downloaded here, so Playwright launches /usr/bin/chromium
(override with APPLIANCE_CHROMIUM). A missing browser fails the tests loudly.
"""
import os
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("APPLIANCE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("APPLIANCE_SCREENSHOTS", Path(__file__).resolve().parents[2] / "var" / "screenshots"))


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (see .ci/run)")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page(browser, box):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=box.url)
    # Only the box itself: any request elsewhere (a CDN, a web font) fails the page loudly.
    context.route(lambda url: not url.startswith(box.url) and not url.startswith("data:"),
                  lambda route: route.abort())
    yield context.new_page()
    context.close()


@pytest.fixture(scope="session")
def shot():
    """Return a function saving a full-page screenshot under SHOTS (gitignored, under var/)."""
    SHOTS.mkdir(parents=True, exist_ok=True)

    def save(page, name: str) -> Path:
        path = SHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return save
