"""Real Chromium for trio tests: Playwright's async API on an asyncio loop of
its own thread, each step awaited from trio.

Playwright cannot run inside trio, so every call to it happens on that
loop: a test hands over a function of the page (``tab.do(lambda page:
page.click("#x"))``) and awaits the result through a worker thread. The
browser is Debian's ``chromium`` (``playwright install`` cannot download
browsers here). Where it, or Playwright, is missing the browser tests skip
with the reason, and fail under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any

import pytest
import trio

CHROMIUM = Path("/usr/bin/chromium")
# This machine refuses outside connections; keep Chromium from trying any.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
#: Playwright's wait for a page to show something: a guard against a hung
#: test, never a timing assertion (the reconnect test waits longer, for the
#: client's own backoff).
WAIT_MS = 10_000


def unavailable(reason: str) -> None:
    """Skip the browser tests, or fail them under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


class Browser:
    """Chromium on an asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        try:
            from playwright.async_api import async_playwright, expect
        except ImportError as exc:
            unavailable(f"playwright is not installed ({exc}): pip install -e '.[test]'")
        if not CHROMIUM.exists():
            unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
        expect.set_options(timeout=WAIT_MS)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="playwright",
                                       daemon=True)
        self.thread.start()

        async def launch():
            playwright = await async_playwright().start()
            try:
                browser = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                           args=ARGS)
            except Exception:
                await playwright.stop()
                raise
            return playwright, browser

        try:
            self.playwright, self.browser = self.wait(launch())
        except Exception as exc:
            self.close_loop()
            unavailable(f"chromium does not start: {exc}")

    def wait(self, coroutine: Awaitable) -> Any:
        """Run ``coroutine`` on the browser's loop; block until it is done."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def run(self, coroutine: Awaitable) -> Any:
        """Run ``coroutine`` on the browser's loop; trio waits in a thread."""
        return await trio.to_thread.run_sync(self.wait, coroutine, abandon_on_cancel=True)

    def close(self) -> None:
        async def stop():
            await self.browser.close()
            await self.playwright.stop()

        self.wait(stop())
        self.close_loop()

    def close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()  # its self-pipe sockets too


class Tab:
    """One page of a browser context, driven from trio.

    Records what a user would never want to see: uncaught script errors,
    dialogs (an ``alert`` would mean a peer's text ran as script), and
    requests that leave the page's own origin."""

    def __init__(self, browser: Browser, page, origin: str) -> None:
        self.browser = browser
        self.page = page
        self.origin = origin
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.console: list[str] = []
        self.foreign: list[str] = []

    def listen(self) -> None:
        """Subscribe to the page's events (on the browser's loop)."""
        # blob: URLs the page made itself (GradAgenda media, issue 23) carry its origin.
        page, own = self.page, (self.origin + "/", "ws" + self.origin[4:] + "/", "data:",
                                "blob:" + self.origin + "/")

        def on_dialog(dialog) -> None:
            self.dialogs.append(dialog.message)
            asyncio.ensure_future(dialog.dismiss())

        def on_request(request) -> None:
            if not request.url.startswith(own):
                self.foreign.append(request.url)

        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("dialog", on_dialog)
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        page.on("request", on_request)

    async def do(self, step: Callable[[Any], Awaitable]) -> Any:
        """``await step(page)`` on the browser's loop; its result."""
        page = self.page

        async def run():
            return await step(page)

        return await self.browser.run(run())

    # Shorthands for the steps the tests take most.

    async def fill(self, selector: str, text: str) -> None:
        await self.do(lambda page: page.fill(selector, text))

    async def click(self, selector: str) -> None:
        await self.do(lambda page: page.click(selector))

    async def press(self, selector: str, key: str) -> None:
        await self.do(lambda page: page.press(selector, key))

    async def expect(self, selector: str, check: str, *args: Any, **kwargs: Any) -> None:
        """Wait until ``expect(locator)``'s ``check`` holds (Playwright's
        auto-waiting assertions: to_have_text, to_contain_text, ...)."""
        from playwright.async_api import expect

        await self.do(lambda page: getattr(expect(page.locator(selector)), check)(*args, **kwargs))

    async def texts(self, selector: str) -> list[str]:
        return await self.do(lambda page: page.locator(selector).all_text_contents())

    def troubles(self) -> list[str]:
        """What went wrong on this page that a user would notice, or a
        Content-Security-Policy violation (the page must not need one)."""
        csp = [line for line in self.console if "Content Security Policy" in line]
        return ([f"script error: {e}" for e in self.errors]
                + [f"dialog: {d}" for d in self.dialogs]
                + [f"request off the page's origin: {u}" for u in self.foreign]
                + csp)


class Context:
    """A fresh browser profile (cookies, storage) for one test."""

    def __init__(self, browser: Browser, **options: Any) -> None:
        self.browser = browser

        async def make():
            context = await browser.browser.new_context(**options)
            context.set_default_timeout(WAIT_MS)
            return context

        self.context = browser.wait(make())
        self.tabs: list[Tab] = []

    async def open(self, url: str, viewport: dict | None = None) -> Tab:
        """A new page showing ``url``, at ``viewport`` size if given."""
        context = self.context
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"  # the web client's and the admin page's

        async def make():
            page = await context.new_page()
            if viewport is not None:
                await page.set_viewport_size(viewport)
            tab = Tab(self.browser, page, origin)
            tab.listen()
            await page.goto(url)
            return tab

        tab = await self.browser.run(make())
        self.tabs.append(tab)
        return tab

    async def set_offline(self, offline: bool) -> None:
        """Emulate losing (or getting back) the network, as the browser sees it."""
        await self.browser.run(self.context.set_offline(offline))

    def close(self) -> None:
        self.browser.wait(self.context.close())
