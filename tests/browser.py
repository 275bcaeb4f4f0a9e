"""Headless Chromium for tests that assert on what a reader of a page *sees*.

Chromium and its driver come from Debian's packages `chromium` and
`chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver). When they are
missing, the session-scoped fixture `chromium` installs them with apt-get
(root only); where that cannot be done it skips the test with the reason.
Selenium drives the browser through the given chromedriver, so Selenium
Manager never downloads anything.

Use in a test module (import the fixtures explicitly, as with fixtures_http):

    from browser import browser, chromium  # noqa: F401 (fixtures)
    from browser import open_file, visible_text, broken_images

    def test_report(browser, tmp_path):
        open_file(browser, tmp_path / "index.html")
        assert "Accuracy" in visible_text(browser)
        assert broken_images(browser) == []

Fixtures:
  chromium   session: makes sure Chromium and chromedriver are installed
             (installs them or skips) -> CHROMIUM's path.
  browser    session: one headless Chromium (a Selenium WebDriver) for the
             whole session, viewport VIEWPORT (1280 x 1000 CSS px); tests (and
             modules) share it, so a test that calls set_viewport puts it back.

Outside fixtures: install_chromium() -> (ready, reason), start_browser(dir)
-> WebDriver (the caller quits it).

Helpers (`driver` is the WebDriver, `element` a WebElement):
  set_viewport(driver, w, h)       make the page's viewport w x h CSS px (e.g. a
                                   phone's 390 x 844) -> previous (w, h)
  open_file(driver, path)          load a local file; wait for the document and
                                   all <img> to finish loading -> file:// URL
  visible_text(driver, element=None)  innerText: the text a reader sees
                                   (no display:none, no closed <details>) -> str
  broken_images(driver)            <img> that failed to decode/load -> [src]
  horizontal_overflow(driver)      px the page is wider than the viewport -> int
  too_wide_elements(driver)        outermost elements sticking out on the
                                   right -> [description]
  is_visible(element)              shown, non-empty, not transparent, and inside
                                   the viewport once scrolled to -> bool
  covering_element(element)        what is drawn over the element's centre when
                                   it is not the element itself -> description | None
  overlaps(a, b)                   bounding boxes intersect (> 1 px^2) -> bool
  overlapping_pairs(driver, css)   pairs of visible elements matching css whose
                                   boxes intersect -> [(i, j)]
  table_rows(table)                a <table> as rows of visible cell texts
                                   -> [[str]]
  console_errors(driver)           SEVERE browser-console messages since the last
                                   call (failed loads, JS errors) -> [str]
  resource_urls(driver)            URLs the page fetched (images, scripts, css;
                                   not data: URIs) -> [str]
  screenshot(driver, path)         full-page PNG (beyond the viewport) -> Path
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
APT_PACKAGES = ("chromium", "chromium-driver")
APT_TIME_BUDGET_S = 780      # update + install together; pytest-timeout is 900 s per test
VIEWPORT = (1280, 1000)     # CSS px the page is laid out in (innerWidth, innerHeight)
LOAD_TIMEOUT_S = 30

# Flags for a headless Chromium as root in a container on a closed network:
# the network ones keep Chromium from reaching for Google's services in the
# background (defensive: Debian's build showed no such errors here without them).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",                      # root in a container: no user namespaces
    "--disable-gpu",
    "--disable-dev-shm-usage",           # small /dev/shm in containers
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    "--hide-scrollbars",                 # scrollbars would change the viewport width
    "--force-device-scale-factor=1",
    "--lang=en-US",
)


# --------------------------------------------------------------------------- install

def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run_apt(args: list[str], timeout: float) -> tuple[bool, str]:
    """Run an apt command; (succeeded, combined output)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        done = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") + (err.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return False, f"{out}\n[{' '.join(args)} timed out after {timeout:.0f} s]"
    return done.returncode == 0, done.stdout + done.stderr


def _apt_has_candidates() -> bool:
    """Whether apt's package lists already offer every package in APT_PACKAGES."""
    ok, out = _run_apt(["apt-cache", "policy", *APT_PACKAGES], timeout=60)
    if not ok:
        return False
    candidates = [line.split(":", 1)[1].strip() for line in out.splitlines()
                  if line.strip().startswith("Candidate:")]
    return len(candidates) == len(APT_PACKAGES) and "(none)" not in candidates


def chromium_missing() -> list[str]:
    """The paths of CHROMIUM and CHROMEDRIVER that are not executable files."""
    return [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]


def install_chromium() -> tuple[bool, str]:
    """Install Debian's chromium and chromium-driver where they are missing.

    Runs `apt-get update` only when the package lists offer no candidate (or
    when a first install attempt fails, e.g. on stale lists), then
    `apt-get install -y --no-install-recommends chromium chromium-driver`.
    Returns (ready, reason): reason says why not, with the tail of apt's output.
    """
    if not chromium_missing():
        return True, "already installed"
    if getattr(os, "geteuid", lambda: -1)() != 0:
        return False, f"{', '.join(chromium_missing())} missing and not root, so cannot apt-get install"
    if shutil.which("apt-get") is None:
        return False, f"{', '.join(chromium_missing())} missing and there is no apt-get"
    deadline = time.monotonic() + APT_TIME_BUDGET_S
    lock = ["-o", "DPkg::Lock::Timeout=120"]
    install = ["apt-get", "install", "-y", "--no-install-recommends", *lock, *APT_PACKAGES]
    updated, log = False, ""
    if not _apt_has_candidates():
        _, out = _run_apt(["apt-get", "update", *lock], deadline - time.monotonic())
        updated, log = True, out
    ok, out = _run_apt(install, deadline - time.monotonic())
    log += out
    if not ok and not updated and deadline - time.monotonic() > 30:
        # the lists may be stale (the mirror no longer has those versions): refresh, retry
        _, out = _run_apt(["apt-get", "update", *lock], deadline - time.monotonic())
        ok, out2 = _run_apt(install, deadline - time.monotonic())
        log += out + out2
    missing = chromium_missing()
    if ok and not missing:
        return True, "installed"
    return False, (f"could not install {' '.join(APT_PACKAGES)} with apt-get "
                   f"(still missing: {', '.join(missing) or 'nothing'}):\n{_tail(log)}")


# Each test module that imports a fixture gets its own copy of it from pytest,
# so session-wide sharing is done here: one install attempt and one browser
# per process, however many modules import the fixtures.
_SHARED: dict = {"install": None, "driver": None}


@pytest.fixture(scope="session")
def chromium():
    """Make sure /usr/bin/chromium and /usr/bin/chromedriver exist: install them
    with apt-get when missing (tried once per session), else skip the test."""
    if _SHARED["install"] is None:
        _SHARED["install"] = install_chromium()
    ready, reason = _SHARED["install"]
    if not ready:
        pytest.skip(f"headless Chromium unavailable: {reason}")
    return CHROMIUM


# --------------------------------------------------------------------------- browser

def chromium_options(user_data_dir: Path):
    """Selenium ChromeOptions for a quiet headless Chromium with its own profile."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}")
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


def start_browser(work: Path):
    """Start headless Chromium through /usr/bin/chromedriver (never Selenium
    Manager), with a fresh profile in `work`/profile and chromedriver's log
    (Chromium's stderr included) in `work`/chromedriver.log. Returns the
    WebDriver; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(work / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=chromium_options(work / "profile"))
    driver.set_page_load_timeout(LOAD_TIMEOUT_S)
    driver.set_script_timeout(LOAD_TIMEOUT_S)
    set_viewport(driver, *VIEWPORT)
    return driver


def set_viewport(driver, width: int, height: int) -> tuple[int, int]:
    """Resize the window so that the page's viewport (innerWidth x innerHeight) is
    width x height CSS px; headless Chromium's window is taller than its viewport
    (1000 px tall gives 857). Returns the viewport size before, to put it back."""
    before = tuple(driver.execute_script("return [innerWidth, innerHeight];"))
    for _ in range(3):
        inner = driver.execute_script("return [innerWidth, innerHeight];")
        if inner == [width, height]:
            break
        outer = driver.get_window_size()
        driver.set_window_size(outer["width"] + width - inner[0], outer["height"] + height - inner[1])
    return before


@pytest.fixture(scope="session")
def browser(chromium, tmp_path_factory):
    """One headless Chromium (selenium WebDriver) for the test session, shared by
    every module that imports this fixture; quit at the end of the session."""
    if _SHARED["driver"] is None:
        _SHARED["driver"] = start_browser(tmp_path_factory.mktemp("chromium"))
    yield _SHARED["driver"]
    if _SHARED["driver"] is not None:
        _SHARED["driver"].quit()
        _SHARED["driver"] = None


# --------------------------------------------------------------------------- helpers

def _wait(driver, condition: str, what: str, timeout: float = LOAD_TIMEOUT_S) -> None:
    """Poll the JavaScript expression `condition` until it is true."""
    end = time.monotonic() + timeout
    while not driver.execute_script(f"return Boolean({condition});"):
        if time.monotonic() > end:
            raise TimeoutError(f"page not ready after {timeout} s: {what}")
        time.sleep(0.05)


def open_file(driver, path, timeout: float = LOAD_TIMEOUT_S) -> str:
    """Load the local file `path` and wait until the document, every <img> (lazy
    ones are switched to eager first) and the web fonts are loaded; the page is
    left scrolled to the top. Returns the file:// URL."""
    url = Path(path).resolve().as_uri()
    driver.get(url)
    _wait(driver, "document.readyState === 'complete'", "document.readyState", timeout)
    driver.execute_script(
        "for (const img of document.images) if (img.loading === 'lazy') img.loading = 'eager';")
    _wait(driver, "Array.from(document.images).every(img => img.complete)", "images loading", timeout)
    _wait(driver, "!document.fonts || document.fonts.status === 'loaded'", "fonts loading", timeout)
    driver.execute_script("window.scrollTo(0, 0);")
    return url


def visible_text(driver, element=None) -> str:
    """The text a reader sees: innerText of the body (or of `element`). Leaves out
    display:none / visibility:hidden content and the body of closed <details>;
    follows CSS text-transform and line breaks of block layout."""
    target = element if element is not None else driver.find_element("tag name", "body")
    return driver.execute_script("return arguments[0].innerText;", target)


def _short(src: str, keep: int = 80) -> str:
    return src if len(src) <= keep else src[:keep] + f"...({len(src)} chars)"


def broken_images(driver) -> list[str]:
    """The src (data: URIs cut short) of each <img> that finished loading without a
    picture: missing file, undecodable data (naturalWidth == 0)."""
    srcs = driver.execute_script(
        "return Array.from(document.images)"
        ".filter(img => img.complete && img.naturalWidth === 0)"
        ".map(img => img.getAttribute('src') || '');")
    return [_short(s) for s in srcs]


def horizontal_overflow(driver) -> int:
    """How many CSS pixels the page is wider than the viewport (0: no horizontal
    scrolling needed)."""
    return int(driver.execute_script(
        "const d = document.documentElement, b = document.body;"
        "return Math.max(d.scrollWidth, b ? b.scrollWidth : 0) - d.clientWidth;"))


_DESCRIBE_JS = """
function describe(el) {
  if (!el) return null;
  let s = el.tagName.toLowerCase();
  if (el.id) s += '#' + el.id;
  if (typeof el.className === 'string' && el.className.trim())
    s += '.' + el.className.trim().split(/\\s+/).join('.');
  const text = (el.innerText || '').trim().replace(/\\s+/g, ' ');
  return text ? s + ' "' + text.slice(0, 40) + '"' : s;
}
"""


def too_wide_elements(driver) -> list[str]:
    """Descriptions (tag#id.class "text") of the outermost visible elements whose
    right edge lies beyond the viewport: the culprits of horizontal_overflow."""
    return driver.execute_script(_DESCRIBE_JS + """
      const width = document.documentElement.clientWidth, out = [];
      const all = Array.from(document.body.querySelectorAll('*'));
      const wide = new Set(all.filter(el => {
        const r = el.getBoundingClientRect();
        return r.width > 0 && r.height > 0 && r.right + window.scrollX > width + 0.5;
      }));
      for (const el of wide) {
        let p = el.parentElement, inner = false;
        for (; p; p = p.parentElement) if (wide.has(p)) { inner = true; break; }
        if (!inner) out.push(describe(el));
      }
      return out;""")


def is_visible(element) -> bool:
    """Whether a reader can see `element`: displayed (not display:none, not in a
    closed <details>, not visibility:hidden), of non-zero size, not fully
    transparent, and inside the viewport once scrolled into view. Scrolls the page."""
    if not element.is_displayed():
        return False
    driver = element.parent
    return bool(driver.execute_script("""
      const el = arguments[0];
      if (getComputedStyle(el).visibility !== 'visible') return false;  // inherited value
      for (let e = el; e; e = e.parentElement)    // opacity multiplies down the tree
        if (parseFloat(getComputedStyle(e).opacity) === 0) return false;
      el.scrollIntoView({block: 'center', inline: 'center'});
      const r = el.getBoundingClientRect();
      if (r.width <= 0 || r.height <= 0) return false;
      const vw = document.documentElement.clientWidth, vh = document.documentElement.clientHeight;
      return r.right > 0 && r.bottom > 0 && r.left < vw && r.top < vh;
    """, element))


def covering_element(element) -> str | None:
    """After scrolling `element` into view: a description of the element drawn on
    top at its centre when that is neither `element` nor inside it (something
    covers it), else None."""
    driver = element.parent
    return driver.execute_script(_DESCRIBE_JS + """
      const el = arguments[0];
      el.scrollIntoView({block: 'center', inline: 'center'});
      const r = el.getBoundingClientRect();
      const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
      if (top === null || el.contains(top)) return null;
      return describe(top);
    """, element)


def _rect(element) -> dict:
    return element.parent.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return {left: r.left, top: r.top, right: r.right, bottom: r.bottom};", element)


def overlaps(a, b, min_area: float = 1.0) -> bool:
    """Whether the bounding boxes of elements `a` and `b` intersect by more than
    `min_area` square CSS pixels (touching edges do not count)."""
    ra, rb = _rect(a), _rect(b)
    w = min(ra["right"], rb["right"]) - max(ra["left"], rb["left"])
    h = min(ra["bottom"], rb["bottom"]) - max(ra["top"], rb["top"])
    return w > 0 and h > 0 and w * h > min_area


def overlapping_pairs(driver, css: str, min_area: float = 1.0) -> list[tuple[int, int]]:
    """Index pairs (i, j), i < j, among the displayed elements matching the CSS
    selector `css` (in document order, as find_elements gives them) whose boxes
    intersect by more than `min_area` px^2. For e.g. figures, labels, cards
    that must not be drawn over each other. (An element and a descendant of it
    that both match `css` count as overlapping.)"""
    return [tuple(p) for p in driver.execute_script("""
      const els = Array.from(document.querySelectorAll(arguments[0]));
      const rects = els.map(e => e.getClientRects().length ? e.getBoundingClientRect() : null);
      const out = [];
      for (let i = 0; i < els.length; i++) for (let j = i + 1; j < els.length; j++) {
        const a = rects[i], b = rects[j];
        if (!a || !b) continue;
        const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
        const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
        if (w > 0 && h > 0 && w * h > arguments[1]) out.push([i, j]);
      }
      return out;""", css, min_area)]


def table_rows(table) -> list[list[str]]:
    """A <table> element as its displayed rows (thead, tbody, tfoot in order), each
    a list of the visible text of its th/td cells, whitespace trimmed."""
    return table.parent.execute_script("""
      return Array.from(arguments[0].rows)
        .filter(row => row.getClientRects().length > 0)
        .map(row => Array.from(row.cells).map(c => c.innerText.trim()));""", table)


def console_errors(driver) -> list[str]:
    """Messages of level SEVERE in the browser console since the last call (the log
    is drained on reading): failed resource loads, uncaught JavaScript errors."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def resource_urls(driver) -> list[str]:
    """URLs of the resources the current page fetched (Resource Timing: images,
    scripts, stylesheets, fonts; data: URIs are not listed). A self-contained
    page fetches none, or only file:// ones it was told to."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);")


def screenshot(driver, path) -> Path:
    """Save a PNG of the whole page, beyond the viewport, at `path` (the window is
    not resized). Returns the path."""
    size = driver.execute_script(
        "const d = document.documentElement, b = document.body;"
        "return [Math.max(d.scrollWidth, b ? b.scrollWidth : 0),"
        "        Math.max(d.scrollHeight, b ? b.scrollHeight : 0)];")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
