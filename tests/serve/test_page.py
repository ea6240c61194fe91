"""The chat page in a real browser: Playwright driving Debian's chromium types a message and sees a streamed reply."""

from __future__ import annotations

import shutil

import pytest

from tests.fixtures import HANG_S

WAIT_MS = HANG_S * 1000  # each wait ends once its condition holds: the limit only stops a hung test

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium; "
                                             "`playwright install` cannot download a browser here)")
def test_the_chat_page_streams_a_reply_into_the_conversation(server, run_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text(run_dir.name, timeout=WAIT_MS)
            page.fill("#max-tokens", "24")
            page.fill("#temperature", "0")  # greedy, so the reply is always the same (a sample may end at once)
            page.fill("#input", "hello")
            page.press("#input", "Enter")
            sync_api.expect(page.locator(".msg.user")).to_have_text("hello", timeout=WAIT_MS)
            # The reply's text appears while it streams (its characters may be whitespace: textContent, unnormalized).
            page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.length > 0",
                                   timeout=WAIT_MS)
            sync_api.expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)  # the stream ended
            assert len(page.locator(".msg.assistant").first.text_content()) > 0
        finally:
            browser.close()
