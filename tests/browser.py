"""Open a page in headless Chromium (Debian's package) and record what a person would see."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Debian's /usr/bin/chromium is a shell wrapper; its /etc/chromium.d/dev-shm reads
# `findmnt -bnr -o avail -T /dev/shm` into `[ $shm_avail -lt ... ]`, which breaks (`[: unexpected
# operator`, on every launch) where /dev/shm is mounted twice (containers): findmnt prints two lines.
# The wrapper adds nothing headless Playwright needs (Playwright passes --disable-dev-shm-usage
# itself), so the browser binary is launched directly; the wrapper only where the binary is elsewhere.
CHROMIUM = next(
    (p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if os.access(p, os.X_OK)),
    "/usr/bin/chromium",
)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class PageVisit:
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    images: int = 0  # every image but the "Where the model looks" section's
    where_images: int = 0  # of the "Where the model looks" section: mean maps and its two galleries
    broken_images: list[str] = field(default_factory=list)
    tables: list[list[list[str]]] = field(default_factory=list)
    scroll_width: int = 0  # the page's full width: above the viewport's, it overflows sideways
    viewport_width: int = 0
    banner: str | None = None  # the text of the report's random-weights banner, if shown
    agreement_cells: int = 0  # cells of the report's agreement matrix
    broken_words: list[str] = field(default_factory=list)  # words split over two lines (paths aside)
    overflowing: list[str] = field(default_factory=list)  # elements narrower than their own text
    thumb_widths: list[float] = field(default_factory=list)  # the report gallery's pictures, CSS px


# Words that a line break splits, and boxes whose text is wider than they are: what a reader sees
# as "0.46 / 40" or a label cut off. Paths (class 'path') may break anywhere; SVG text is drawn.
_LAYOUT = """() => {
  const broken = [], over = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || el.closest('.path, svg, style, script') || !el.getClientRects().length) continue;
    const vertical = getComputedStyle(el).writingMode.startsWith('vertical');
    for (const m of node.textContent.matchAll(/[^\\s-]+/g)) {  // a line may break after a hyphen
      const r = document.createRange();
      r.setStart(node, m.index);
      r.setEnd(node, m.index + m[0].length);
      const lines = new Set([...r.getClientRects()].filter(x => x.width > 0 && x.height > 0)
        .map(x => Math.round(vertical ? x.left : x.top)));
      if (lines.size > 1) broken.push(m[0]);
    }
  }
  for (const el of document.querySelectorAll('td, th, h1, h2, h3, p, summary, li, .legend span')) {
    if (el.closest('.path') || !el.getClientRects().length) continue;
    if (el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1 && el.tagName == 'TH')
      over.push(el.tagName + ': ' + el.textContent.trim().slice(0, 40));
  }
  const thumbs = [...document.querySelectorAll('table.gallery:not(.where-gallery) img')];
  return [broken, over, thumbs.map(i => i.getBoundingClientRect().width)];
}"""


def visit(page_path: Path, screenshot: Path, width: int = 1300) -> PageVisit:
    """Load a local HTML file, take a full-page screenshot, and report requests, errors, images."""
    from playwright.sync_api import sync_playwright

    out = PageVisit()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("request", lambda r: out.requests.append(r.url))
            page.on("console", lambda m: out.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: out.page_errors.append(str(e)))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(screenshot), full_page=True)
            where = "document.querySelectorAll('#where-classes img, .where-gallery img').length"
            out.where_images = page.evaluate(where)
            out.images = page.evaluate("document.images.length") - out.where_images
            out.scroll_width = page.evaluate("document.documentElement.scrollWidth")
            out.viewport_width = page.evaluate("document.documentElement.clientWidth")
            banner = page.query_selector("#random-weights")
            out.banner = banner.inner_text() if banner and banner.is_visible() else None
            out.agreement_cells = page.evaluate("document.querySelectorAll('#agreement td[data-rho]').length")
            out.broken_words, out.overflowing, out.thumb_widths = page.evaluate(_LAYOUT)
            out.broken_images = page.evaluate(
                "[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)"
            )
        finally:
            browser.close()
    return out
