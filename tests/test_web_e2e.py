"""The chat page in a real headless Chromium: two users talking through a server.

Needs Debian's ``chromium`` (scripts/install-test-deps.sh installs it) and the
``playwright`` package from the ``test`` extra; Playwright drives the system
browser, it never downloads one. Set MSGNET_SCREENSHOTS to a directory (such as
docs/img) to keep the screenshots that docs/web.md shows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from support import running_server, token

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "no chromium on PATH; run scripts/install-test-deps.sh to install it",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install .[test])"
)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000


def log_in(page: Any, url: str, user: str) -> None:
    page.goto(url)
    page.fill("#user", user)
    page.fill("#token", token(user))
    page.click("#login button[type=submit]")
    sync_api.expect(page.locator("#status")).to_have_text("connected")


def open_conversation(page: Any, label: str) -> None:
    page.locator("#conversations li", has_text=label).click()
    sync_api.expect(page.locator("#title")).to_have_text(label)


def say(page: Any, text: str) -> None:
    page.fill("#body", text)
    page.press("#body", "Enter")
    # Acknowledged: the server has it durably.
    mine = page.locator("#messages li.mine:not(.pending)", has_text=text)
    sync_api.expect(mine).to_have_count(1)


def shows_once(page: Any, text: str) -> None:
    messages = page.locator("#messages li .text", has_text=text)
    sync_api.expect(messages).to_have_count(1)


def drive_two_users(url: str, screenshots: Path) -> None:
    """Everything a person would do, in Playwright's blocking API (own thread)."""
    sync_api.expect.set_options(timeout=WAIT_MS)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            alice_browser = browser.new_context(viewport={"width": 900, "height": 560})
            bob_browser = browser.new_context(viewport={"width": 900, "height": 560})
            alice, bob = alice_browser.new_page(), bob_browser.new_page()
            log_in(alice, url, "alice")
            log_in(bob, url, "bob")

            # One to one, both ways.
            alice.fill("#peer", "bob")
            alice.click("#open-peer button")
            say(alice, "hi bob")
            open_conversation(bob, "alice")
            shows_once(bob, "hi bob")
            say(bob, "hi alice, how are things?")
            shows_once(alice, "hi alice, how are things?")

            # A group, created by alice with bob in it.
            alice.fill("#group-name", "team")
            alice.fill("#group-members", "bob")
            alice.click("#group-form button[name=create]")
            sync_api.expect(alice.locator("#title")).to_have_text("# team")
            say(alice, "hello team")
            open_conversation(bob, "# team")
            shows_once(bob, "hello team")
            say(bob, "hey both of you")
            shows_once(alice, "hey both of you")
            bob.screenshot(path=screenshots / "web-chat-group.png")

            # A dropped connection: the page reconnects and carries on.
            open_conversation(alice, "bob")
            alice.evaluate("window.msgnetChat.dropConnection()")
            sync_api.expect(alice.locator("#status")).to_have_text("connected")
            open_conversation(bob, "alice")
            say(bob, "still there?")
            shows_once(alice, "still there?")
            alice.screenshot(path=screenshots / "web-chat-one-to-one.png")

            # Away entirely: a new page resumes from the stored cursor, and the
            # history it also loads does not show anything twice.
            alice.close()
            say(bob, "while you were away")
            alice = alice_browser.new_page()
            log_in(alice, url, "alice")
            open_conversation(alice, "bob")
            shows_once(alice, "while you were away")
            shows_once(alice, "hi bob")
            shows_once(alice, "still there?")
            cursor = alice.evaluate("window.msgnetChat.state.cursor")
            assert isinstance(cursor, int)
            assert cursor > 0
        finally:
            browser.close()


async def test_two_users_chat_in_the_browser(tmp_path: Path) -> None:
    keep = os.environ.get("MSGNET_SCREENSHOTS")
    screenshots = Path(keep) if keep else tmp_path
    screenshots.mkdir(parents=True, exist_ok=True)

    async with running_server() as server:
        url = f"http://{server.host}:{server.ws_port}/"
        await trio.to_thread.run_sync(drive_two_users, url, screenshots)

    assert (screenshots / "web-chat-one-to-one.png").stat().st_size > 0
