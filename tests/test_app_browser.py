"""A real browser (Debian's chromium driven by Playwright) uses every tab of the app and saves a screenshot of
each to tests/screenshots/ (BLIP2_SCREENSHOTS=docs/screenshots refreshes the ones the README shows)."""

import os
import shutil

import app_support as S
import pytest
from PIL import Image

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = os.path.join(S.ROOT, os.environ.get("BLIP2_SCREENSHOTS", os.path.join("tests", "screenshots")))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api  # a test requirement (requirements-dev.txt): missing means failed, not skipped

    assert os.path.exists(CHROMIUM), f"chromium is not installed ({CHROMIUM} missing): apt-get install chromium"
    os.makedirs(SHOTS, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def open_app(browser, **context):
    page = browser.new_page(**context)
    page.set_default_timeout(60_000)
    page.goto(S.get_server().url)
    page.wait_for_selector("#caption-run")
    return page


@pytest.fixture(scope="module")
def page(browser):
    return open_app(browser, viewport={"width": 1280, "height": 900})


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    return [(s, S.write(d, f"scene{i}.png", S.png_bytes(s.render(224)))) for i, s in
            enumerate(S.one_object_scenes(4))]


def upload(page, elem_id, path):
    page.locator(f"#{elem_id} input[type=file]").set_input_files(path)
    page.locator(f"#{elem_id} img").first.wait_for()


def tab(page, name):
    page.get_by_role("tab", name=name).click()


def idle(page):
    """Wait until no event is pending or streaming (Gradio's status tracker meanwhile). Call it once an output of
    the event has appeared, so the event has started."""
    page.wait_for_function("() => !document.querySelector('.progress-text, .eta-bar, .meta-text-center, "
                           ".wrap.generating')", timeout=60_000)  # .generating: a stream still running


def shot(page, name):
    page.evaluate("async () => { for (const i of document.images) i.loading = 'eager'; }")  # lazy ones below the fold
    page.wait_for_function("() => document.fonts.status === 'loaded' && [...document.images].every(i => i.complete)")
    hide = page.add_style_tag(content="[class*=toast] { visibility: hidden !important; }")  # earlier errors
    page.screenshot(path=os.path.join(SHOTS, name), full_page=True)
    hide.evaluate("e => e.remove()")


def test_caption_tab(page, scene_files):
    scene, path = scene_files[0]
    tab(page, "Caption")
    upload(page, "caption-image", path)
    page.click("#caption-run")
    box = page.locator("#caption-output textarea")
    page.wait_for_function("() => document.querySelector('#caption-output textarea').value.length > 10")
    idle(page)
    assert box.input_value() == scene.caption()
    page.get_by_text("Decoding settings").first.click()  # show the controls in the screenshot
    page.get_by_text("Repetition penalty").first.wait_for()
    shot(page, "caption.png")
    page.get_by_text("Decoding settings").first.click()


def test_a_refused_upload_shows_why(page, tmp_path):
    fake = S.write(tmp_path, "holiday.jpg", b"this is a text file, renamed")
    tab(page, "Caption")
    with page.expect_response(lambda r: "/gradio_api/upload" in r.url):  # the upload has reached the server
        page.locator("#caption-image input[type=file]").set_input_files(fake)
    page.click("#caption-run")
    notice = page.locator("#caption-notice")
    notice.get_by_text("not a file this app can read", exact=False).wait_for()
    page.wait_for_timeout(15_000)  # the toast is gone by now (10 s); the reason must not be
    assert "not a file this app can read" in notice.inner_text()
    for where in ("#caption-notice", "#caption-output"):  # no bare "Error" pill left on an output
        assert "Error" not in page.locator(where).inner_text(), where


def test_a_new_image_clears_the_caption(page, scene_files):
    tab(page, "Caption")
    upload(page, "caption-image", scene_files[0][1])
    page.click("#caption-run")
    page.wait_for_function("() => document.querySelector('#caption-output textarea').value.length > 10")
    idle(page)
    page.locator("#caption-image button[aria-label='Remove Image']").click()
    upload(page, "caption-image", scene_files[1][1])
    page.wait_for_function("() => document.querySelector('#caption-output textarea').value === ''")


def test_a_photo_gets_the_caveat_and_a_world_scene_does_not(page, scene_files, tmp_path):
    from skimage import data

    chelsea = S.write(tmp_path, "chelsea.png", S.png_bytes(Image.fromarray(data.chelsea())))
    tab(page, "Caption")
    notice = page.locator("#caption-notice")
    upload(page, "caption-image", chelsea)
    page.click("#caption-run")
    notice.get_by_text("looks like a photograph", exact=False).wait_for()
    assert "pick a Salesforce checkpoint" in notice.inner_text()
    shot(page, "caption-photo.png")
    page.locator("#caption-image button[aria-label='Remove Image']").click()
    upload(page, "caption-image", scene_files[0][1])
    page.click("#caption-run")
    page.wait_for_function("() => document.querySelector('#caption-output textarea').value.length > 10")
    idle(page)
    assert "photograph" not in notice.inner_text()


def test_chat_tab(page, scene_files):
    scene, path = scene_files[1]
    o = scene.objects[0]
    tab(page, "Chat")
    upload(page, "chat-image", path)
    for question in (f"what color is the {o.shape}?", f"what shape is the {o.color} object?"):
        page.fill("#chat-question textarea, #chat-question input", question)
        page.click("#chat-ask")
        page.get_by_text(question, exact=True).wait_for()
        idle(page)
    bubbles = page.locator("#chat-bot .message-row, #chat-bot [data-testid='bot']")
    page.wait_for_function(
        "n => document.querySelectorAll('#chat-bot [data-testid=\"bot\"]').length >= n", arg=2)
    answers = page.locator("#chat-bot [data-testid='bot']").all_inner_texts()
    assert len(answers) >= 2 and bubbles.count() >= 2
    assert [a.strip() for a in answers] == [o.color, o.shape]
    shot(page, "chat.png")


def test_matching_tab(page, scene_files):
    scene, path = scene_files[2]
    o = scene.objects[0]
    texts = ["a large white cross in the top right", scene.caption(), f"a large {o.color} star in the top left"]
    tab(page, "Matching")
    upload(page, "match-image", path)
    page.fill("#match-texts textarea", "\n".join(texts))
    page.click("#match-run")
    page.locator("#match-heatmap img").wait_for()
    idle(page)
    table = page.locator("#match-table").inner_text()
    assert all(t in table for t in texts)
    first_row = page.locator('#match-table [role=row][aria-rowindex="2"]').first.inner_text()
    assert scene.caption() in first_row, first_row
    assert "Best match" in page.locator("#match-notice").inner_text()
    assert "cut to the retrieval model" not in page.locator("#match-notice").inner_text()
    shot(page, "matching.png")
    page.fill("#match-texts textarea", "\n".join(texts + [S.LONG_TEXT]))  # over the retrieval model's 64 positions
    page.click("#match-run")
    page.locator("#match-notice").get_by_text("was cut to the retrieval model's 64 text tokens", exact=False).wait_for()
    idle(page)


def test_search_tab(page, scene_files):
    target, _ = scene_files[3]
    tab(page, "Search")
    page.locator("#search-gallery input[type=file]").set_input_files([p for _, p in scene_files])
    page.wait_for_function("() => document.querySelectorAll('#search-gallery img').length >= 4")
    page.fill("#search-query textarea, #search-query input", target.caption())
    page.click("#search-run")
    page.wait_for_function("() => document.querySelectorAll('#search-results img').length >= 4")
    idle(page)
    assert "#1 · ITM" in page.locator("#search-results").inner_text()
    table = page.locator("#search-table").inner_text()
    assert all(f"scene{i}.png" in table for i in range(len(scene_files))), table
    first = page.locator('#search-table [role=row][aria-rowindex="2"]').first.inner_text()
    assert "scene3.png" in first, first
    shot(page, "search.png")
    page.fill("#search-query textarea, #search-query input", S.LONG_TEXT)
    page.click("#search-run")
    cut = "was cut to the retrieval model's 64 text tokens"
    page.locator("#search-notice").get_by_text(cut, exact=False).wait_for()
    idle(page)


def test_example_gallery_and_about(page):
    tab(page, "Search")
    page.click("#search-examples")
    page.wait_for_function("() => document.querySelectorAll('#search-gallery img').length >= 8")
    tab(page, "About")
    page.get_by_text("/caption").first.wait_for()
    snippet = page.locator("#about-snippet")
    snippet.get_by_text(f'Client("{S.get_server().url}")', exact=False).wait_for()  # the address it was served from
    assert page.locator("footer").get_by_text("Use via API", exact=False).is_visible()
    shot(page, "about.png")


def test_a_failed_load_reverts_the_picker(page):  # last on the desktop page: the reason stays in the header
    picker = page.locator("#model-picker input")
    picker.click()
    page.get_by_role("option", name="Salesforce/blip2-opt-2.7b", exact=True).click()
    page.click("#model-load")
    status = page.locator("#model-status")
    status.get_by_text("Not done", exact=False).wait_for()  # offline here: the load fails
    assert "Salesforce/blip2-opt-2.7b" in status.inner_text() and "Serving:" in status.inner_text()
    page.wait_for_function("() => document.querySelector('#model-picker input').value === 'blip2-tiny (embedded)'")


# ----------------------------------------------------------------------------------------------------
# a phone (390 x 844), checked as a person would look at it

TABS = ["Caption", "Chat", "Matching", "Search", "About"]

SQUEEZED_WORDS = """() => {
  // Every word of visible text that the layout broke over two or more lines (a column narrower than its words).
  const out = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || !el.offsetParent || getComputedStyle(el).visibility === 'hidden' || el.closest('pre, code')) continue;
    for (const m of node.textContent.matchAll(/\\S{2,30}/g)) {
      const range = document.createRange();
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const lines = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
      if (lines.size > 1) out.push(m[0]);
    }
  }
  return out;
}"""


@pytest.fixture(scope="module")
def phone(browser):
    return open_app(browser, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                    has_touch=True)


def test_phone_every_tab_is_reachable_and_nothing_is_squeezed(phone, scene_files):
    first_screen = [t for t in TABS if phone.get_by_role("tab", name=t).bounding_box()["y"] < 844]
    assert first_screen == TABS  # all five tab buttons on the first screen, none behind a menu
    for name in TABS:
        tab(phone, name)
        panel = phone.locator(f"#tab-{name.lower()}")
        panel.wait_for(state="visible")
        width = phone.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width[0] <= width[1], f"{name}: the page scrolls sideways ({width[0]} > {width[1]} px)"
        assert phone.evaluate(SQUEEZED_WORDS) == [], name
    tab(phone, "Matching")  # with results: the table and the charts must fit too
    scene, path = scene_files[2]
    upload(phone, "match-image", path)
    texts = [scene.caption(), "a large white cross in the top right"]
    phone.fill("#match-texts textarea", "\n".join(texts))
    phone.click("#match-run")
    phone.locator("#match-heatmap img").wait_for(state="attached")  # below the fold: lazily drawn
    idle(phone)
    assert phone.evaluate(SQUEEZED_WORDS) == []
    width = phone.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1]
    table = phone.locator("#match-table").inner_text()
    assert all(t in table for t in texts)  # each candidate's full text
    shot(phone, "phone-matching.png")
    tab(phone, "Caption")
    shot(phone, "phone-caption.png")
