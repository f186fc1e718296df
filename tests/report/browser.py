"""A real headless Chromium for the report tests, driven by Playwright (no browser download).

The browser is Debian's `chromium-headless-shell` (or `chromium`); CI installs it before the tests
(`.ci/run`). On a machine without it the browser tests skip and say how to install it.
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BROWSERS = ("chromium-headless-shell", "chromium")
INSTALL = ("a headless Chromium is needed: `apt-get install -y chromium-headless-shell` (Debian) and "
           "`pip install -r requirements.txt` (playwright); .ci/run installs both")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


def browser_executable() -> str:
    """The Chromium binary, or a skip that says how to install it."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(INSTALL)


@dataclass
class PageLog:
    """What the page did: every request and every console error or uncaught exception."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def open_page(path: Path, width: int = 1280):
    """(page, log) for a local HTML file opened in headless Chromium."""
    executable = browser_executable()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(INSTALL)
    log = PageLog()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("request", lambda request: log.requests.append(request.url))
            page.on("console", lambda message: log.errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: log.errors.append(str(error)))
            page.goto(Path(path).resolve().as_uri())
            page.wait_for_load_state("load")
            yield page, log
        finally:
            browser.close()
