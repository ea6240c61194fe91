"""The chat page in a real browser: Playwright driving Debian's chromium types a message and sees a streamed reply."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium; "
                                             "`playwright install` cannot download a browser here)")
def test_the_chat_page_streams_a_reply_into_the_conversation(server, run_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text(run_dir.name)
            page.fill("#max-tokens", "24")
            page.fill("#input", "Repeat: hello")
            page.press("#input", "Enter")
            sync_api.expect(page.locator(".msg.user")).to_have_text("Repeat: hello")
            reply = page.locator(".msg.assistant").first
            sync_api.expect(reply).not_to_be_empty(timeout=20_000)
            sync_api.expect(page.locator("#send")).to_be_enabled(timeout=20_000)  # the stream ended
            assert len(reply.inner_text()) > 0
        finally:
            browser.close()
