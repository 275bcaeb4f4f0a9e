"""The headless-Chromium helpers of tests/browser.py, proved on a small static page."""

import base64
import struct
import zlib

import pytest
from PIL import Image

import browser as setup
from browser import browser, chromium  # noqa: F401 (fixtures)
from browser import (
    VIEWPORT,
    broken_images,
    console_errors,
    covering_element,
    horizontal_overflow,
    is_visible,
    open_file,
    overlapping_pairs,
    overlaps,
    resource_urls,
    screenshot,
    set_viewport,
    table_rows,
    too_wide_elements,
    visible_text,
)


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour RGB PNG, written by hand (no imaging library involved)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


RED_PNG = base64.b64encode(png_bytes(60, 40, (255, 0, 0))).decode()

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Static page</title>
<style>
  body {{ margin: 0; font-family: sans-serif; }}
  .box {{ position: absolute; width: 100px; height: 100px; top: 200px; }}
  #box-a {{ left: 600px; background: #ccc; }}
  #box-b {{ left: 640px; top: 240px; background: #999; }}
  #box-c {{ left: 900px; background: #666; }}
  #wide {{ width: 3000px; background: blue; }}
  #inner {{ display: inline-block; width: 2900px; }}
</style></head>
<body>
  <h1>Robustness report</h1>
  <p id="shown">Accuracy under attack</p>
  <img id="good" alt="red square" src="data:image/png;base64,{png}">
  <img id="bad" alt="missing" src="does-not-exist.png">
  <table id="metrics">
    <thead><tr><th>model</th><th>accuracy</th></tr></thead>
    <tbody>
      <tr><td>resnet</td><td> 0.91 </td></tr>
      <tr style="display:none"><td>secret-row</td><td>0.00</td></tr>
      <tr><td>vit</td><td>0.88</td></tr>
    </tbody>
  </table>
  <details id="closed"><summary>More details</summary><p id="collapsed">collapsed-text</p></details>
  <details open><summary>Open section</summary><p>open-text</p></details>
  <p id="gone" style="display:none">display-none-text</p>
  <p id="invisible" style="visibility:hidden">visibility-hidden-text</p>
  <p id="transparent" style="opacity:0">transparent-text</p>
  <p id="offscreen" style="position:absolute; left:-9999px; top:0">offscreen-text</p>
  <div style="position:fixed; top:0; left:1150px; width:100px; height:3000px">
    <p id="unreachable" style="margin-top:1500px">in a fixed panel, below the viewport</p></div>
  <div class="box" id="box-a">A</div>
  <div class="box" id="box-b">B</div>
  <div class="box" id="box-c">C</div>
  {wide}
  <p id="far" style="margin-top:3000px">far-below-text</p>
</body></html>
"""


@pytest.fixture
def page(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(PAGE.format(png=RED_PNG, wide=""))
    return path


@pytest.fixture
def wide_page(tmp_path):
    path = tmp_path / "wide.html"
    path.write_text(PAGE.format(png=RED_PNG, wide='<div id="wide"><span id="inner">too wide</span></div>'))
    return path


def test_open_file_waits_for_images_and_sets_viewport(browser, page):
    url = open_file(browser, page)
    assert url == page.resolve().as_uri()
    assert browser.title == "Static page"
    good = browser.find_element("id", "good")
    assert browser.execute_script("return arguments[0].naturalWidth;", good) == 60
    assert browser.execute_script("return [innerWidth, innerHeight];") == list(VIEWPORT)


def test_set_viewport_narrow_page_overflows(browser, wide_page):
    open_file(browser, wide_page)
    before = set_viewport(browser, 390, 844)
    try:
        assert before == VIEWPORT
        assert browser.execute_script("return [innerWidth, innerHeight];") == [390, 844]
        assert horizontal_overflow(browser) == 3000 - 390
    finally:
        set_viewport(browser, *before)
    assert browser.execute_script("return [innerWidth, innerHeight];") == list(VIEWPORT)


def test_visible_text_leaves_out_hidden_and_collapsed(browser, page):
    open_file(browser, page)
    text = visible_text(browser)
    for seen in ("Robustness report", "Accuracy under attack", "More details",
                 "Open section", "open-text", "far-below-text", "resnet"):
        assert seen in text
    for unseen in ("collapsed-text", "display-none-text", "visibility-hidden-text",
                   "secret-row"):
        assert unseen not in text
    assert visible_text(browser, browser.find_element("id", "shown")) == "Accuracy under attack"


def test_broken_images(browser, page):
    open_file(browser, page)
    assert broken_images(browser) == ["does-not-exist.png"]
    browser.execute_script("document.getElementById('bad').remove();")
    assert broken_images(browser) == []


def test_horizontal_overflow(browser, page, wide_page):
    open_file(browser, page)
    assert horizontal_overflow(browser) == 0
    assert too_wide_elements(browser) == []
    open_file(browser, wide_page)
    assert horizontal_overflow(browser) == 3000 - VIEWPORT[0]
    assert too_wide_elements(browser) == ['div#wide "too wide"']


def test_is_visible(browser, page):
    open_file(browser, page)
    by_id = lambda name: browser.find_element("id", name)  # noqa: E731
    # displayed as far as Selenium knows, but no scrolling brings it into view
    assert by_id("unreachable").is_displayed()
    assert not is_visible(by_id("unreachable"))
    assert is_visible(by_id("shown"))
    assert is_visible(by_id("good"))
    assert is_visible(by_id("far"))          # below the fold: visible once scrolled to
    assert browser.execute_script("return window.scrollY;") > 0
    for hidden in ("collapsed", "gone", "invisible", "transparent", "offscreen"):
        assert not by_id(hidden).is_displayed(), hidden
        assert not is_visible(by_id(hidden)), hidden


def test_overlaps_and_covering(browser, page):
    open_file(browser, page)
    a, b, c = (browser.find_element("id", f"box-{k}") for k in "abc")
    assert overlaps(a, b)
    assert not overlaps(a, c)
    assert overlapping_pairs(browser, ".box") == [(0, 1)]
    assert covering_element(a) == 'div#box-b.box "B"'
    assert covering_element(b) is None
    assert covering_element(c) is None


def test_table_rows(browser, page):
    open_file(browser, page)
    rows = table_rows(browser.find_element("id", "metrics"))
    assert rows == [["model", "accuracy"], ["resnet", "0.91"], ["vit", "0.88"]]


def test_console_errors_and_resources(browser, page):
    console_errors(browser)                  # drain what earlier pages logged
    open_file(browser, page)
    errors = console_errors(browser)
    assert any("does-not-exist.png" in e for e in errors), errors
    urls = resource_urls(browser)
    assert not any(u.startswith("data:") for u in urls)
    assert all(u.startswith("file://") for u in urls), urls


def test_screenshot_is_full_page(browser, page, tmp_path):
    open_file(browser, page)
    shot = screenshot(browser, tmp_path / "shots" / "page.png")
    height = browser.execute_script("return document.documentElement.scrollHeight;")
    with Image.open(shot) as image:
        assert image.size == (VIEWPORT[0], height)
        assert height > VIEWPORT[1]       # beyond the viewport
        good = browser.find_element("id", "good")
        x, y = good.location["x"] + 30, good.location["y"] + 20
        assert image.convert("RGB").getpixel((x, y)) == (255, 0, 0)
        far = browser.find_element("id", "far")
        assert far.location["y"] > VIEWPORT[1]
        # the text far below the fold was drawn: dark pixels in its line
        box = (far.location["x"], far.location["y"],
               far.location["x"] + far.size["width"], far.location["y"] + far.size["height"])
        assert image.convert("L").crop(box).getextrema()[0] < 128


# ------------------------------------------------------------------ the install path, faked

class FakeApt:
    """Stands in for browser._run_apt: answers each apt command from a table of
    (succeeded, output) by its first words, and records the commands."""

    def __init__(self, answers):
        self.answers, self.calls, self.installed = answers, [], False

    def __call__(self, args, timeout):
        name = " ".join(args[:2])
        self.calls.append(name)
        ok, out = self.answers[name].pop(0) if isinstance(self.answers[name], list) else self.answers[name]
        if name == "apt-get install" and ok:
            self.installed = True
        return ok, out


@pytest.fixture
def as_root_without_chromium(monkeypatch):
    def install(fake):
        monkeypatch.setattr(setup.os, "geteuid", lambda: 0)
        monkeypatch.setattr(setup.shutil, "which", lambda name: f"/usr/bin/{name}")
        monkeypatch.setattr(setup, "_run_apt", fake)
        monkeypatch.setattr(setup, "chromium_missing",
                            lambda: [] if fake.installed else [setup.CHROMIUM, setup.CHROMEDRIVER])
        return fake
    return install


HAS = (True, "chromium:\n  Candidate: 150.0-1\nchromium-driver:\n  Candidate: 150.0-1\n")
NONE = (True, "chromium:\n  Candidate: (none)\nchromium-driver:\n  Candidate: (none)\n")


def test_install_refused_when_not_root(monkeypatch):
    monkeypatch.setattr(setup, "chromium_missing", lambda: [setup.CHROMIUM])
    monkeypatch.setattr(setup.os, "geteuid", lambda: 1000)
    ready, reason = setup.install_chromium()
    assert not ready and "not root" in reason and setup.CHROMIUM in reason


def test_install_refused_without_apt(monkeypatch):
    monkeypatch.setattr(setup, "chromium_missing", lambda: [setup.CHROMEDRIVER])
    monkeypatch.setattr(setup.os, "geteuid", lambda: 0)
    monkeypatch.setattr(setup.shutil, "which", lambda name: None)
    ready, reason = setup.install_chromium()
    assert not ready and "no apt-get" in reason


def test_install_updates_only_when_lists_lack_chromium(as_root_without_chromium):
    fake = as_root_without_chromium(FakeApt({"apt-cache policy": HAS, "apt-get install": (True, "")}))
    assert setup.install_chromium() == (True, "installed")
    assert fake.calls == ["apt-cache policy", "apt-get install"]
    fake = as_root_without_chromium(FakeApt({"apt-cache policy": NONE, "apt-get update": (True, ""),
                                             "apt-get install": (True, "")}))
    assert setup.install_chromium() == (True, "installed")
    assert fake.calls == ["apt-cache policy", "apt-get update", "apt-get install"]


def test_install_retries_after_update_then_reports_apt_output(as_root_without_chromium):
    fake = as_root_without_chromium(FakeApt({
        "apt-cache policy": HAS, "apt-get update": (True, "Hit:1 bookworm"),
        "apt-get install": [(False, "E: Failed to fetch chromium_150 404 Not Found"),
                            (False, "E: Unable to locate package chromium-driver")]}))
    ready, reason = setup.install_chromium()
    assert not ready
    assert fake.calls == ["apt-cache policy", "apt-get install", "apt-get update", "apt-get install"]
    assert "E: Unable to locate package chromium-driver" in reason
    assert "still missing: /usr/bin/chromium" in reason


def test_apt_timeout_is_reported():
    ok, out = setup._run_apt(["sleep", "5"], timeout=0.5)
    assert not ok and "timed out after" in out
