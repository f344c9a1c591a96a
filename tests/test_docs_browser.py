"""The built documentation site works in a real browser: navigation, search, API reference.

``make docs`` proves the pages build; only a browser proves what a reader gets: Material's
navigation and search are JavaScript, and the API reference is what mkdocstrings rendered
from the code. The site is served from a local HTTP server and opened in Debian's chromium
through Playwright (tools/site_browser.py); without chromium or playwright the tests are
skipped, saying which is missing (``.ci/run`` installs chromium).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import site_browser

_MISSING = site_browser.unavailable()

pytestmark = [
    pytest.mark.process,
    pytest.mark.slow,
    pytest.mark.skipif(_MISSING is not None, reason=f"no browser: {_MISSING}"),
]

_WAIT = 30_000
if _MISSING is None:
    from playwright.sync_api import Page, expect, sync_playwright

    expect.set_options(timeout=_WAIT)


@pytest.fixture(scope="module")
def site_url(docs_site: Path) -> Iterator[str]:
    with site_browser.serving(docs_site) as url:
        yield url


@pytest.fixture
def page(site_url: str) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = site_browser.launch(playwright)
        try:
            # Wide enough that Material shows the navigation as a sidebar, not a drawer.
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(_WAIT)
            yield page
        finally:
            browser.close()


def test_the_navigation_lists_every_section_and_reaches_the_tutorial(
    page: Page, site_url: str
) -> None:
    page.goto(site_url)
    nav = page.locator("nav.md-nav--primary")
    for entry in ("Tutorial", "How-to guides", "Reference", "Explanation"):
        expect(nav.get_by_role("navigation", name=entry, exact=True)).to_be_visible()
    for entry in ("Your first driver", "Testing handlers", "Python API", "The command line"):
        expect(nav.get_by_role("link", name=entry, exact=True)).to_be_visible()

    nav.get_by_role("link", name="Your first driver", exact=True).click()
    page.wait_for_url(f"{site_url}tutorial/first-driver/")
    expect(page.get_by_role("heading", level=1)).to_contain_text("Your first driver")


def test_the_search_finds_a_word_of_the_docs(page: Page, site_url: str) -> None:
    page.goto(site_url)
    page.locator("input[data-md-component=search-query]").click()
    page.keyboard.type("ledger")
    results = page.locator(".md-search-result__item")
    expect(results.first).to_be_visible()
    expect(page.locator(".md-search-result__meta")).to_contain_text("matching document")
    # The run ledger is explained on the delivery page: the search must lead there.
    expect(page.locator(".md-search-result a[href*='explanation/delivery']").first).to_be_attached()


def test_the_api_reference_shows_what_mkdocstrings_rendered(page: Page, site_url: str) -> None:
    page.goto(f"{site_url}reference/api/")
    heading = page.locator("h2[id='conveyor_driver.Driver']")
    expect(heading).to_be_visible()
    expect(heading).to_contain_text("Driver")
    # The signature mkdocstrings wrote from the type hints, right under the heading.
    signature = page.locator("h2[id='conveyor_driver.Driver'] + div.doc-signature")
    expect(signature).to_contain_text("Driver(")
    expect(signature).to_contain_text("max_attempts: int = 3")
    expect(page.locator("h2[id='conveyor_driver.testing.FakeContext']")).to_be_visible()
