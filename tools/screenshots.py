"""Screenshots of the built documentation site, to look at it as a reader would.

``make docs-screenshots`` builds the site and runs this: the home page, the tutorial, the
API reference and a search, as Debian's chromium renders them (tools/site_browser.py),
written as PNGs to ``/tmp/docs-screenshots/`` (not committed: they change with every page).
The browser test checks what can be checked; these are for the eyes: layout, code blocks, the theme.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import site_browser

#: File name → the page's path under the site's root.
PAGES = {
    "home.png": "",
    "tutorial.png": "tutorial/first-driver/",
    "reference-api.png": "reference/api/",
}


def main() -> int:
    parser = argparse.ArgumentParser(description="Screenshots of the built documentation site.")
    parser.add_argument("--site", type=Path, default=Path("site"), help="the built site")
    parser.add_argument("--out", type=Path, default=Path("/tmp/docs-screenshots"))
    args = parser.parse_args()
    missing = site_browser.unavailable()
    if missing is not None:
        print(f"screenshots: no browser: {missing}", file=sys.stderr)
        return 1
    if not (args.site / "index.html").exists():
        print(f"screenshots: {args.site} has no site: run `make docs` first", file=sys.stderr)
        return 1

    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with site_browser.serving(args.site) as url, sync_playwright() as playwright:
        browser = site_browser.launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            for name, path in PAGES.items():
                page.goto(url + path, wait_until="networkidle")
                page.screenshot(path=args.out / name)
                print(args.out / name)
            # Material's search, as a reader sees it after typing a word.
            page.goto(url, wait_until="networkidle")
            page.locator("input[data-md-component=search-query]").click()
            page.keyboard.type("ledger")
            page.locator(".md-search-result__item").first.wait_for()
            # Material fades the results in; a shot taken at once catches them half-drawn.
            page.wait_for_timeout(1000)
            page.screenshot(path=args.out / "search.png")
            print(args.out / "search.png")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
