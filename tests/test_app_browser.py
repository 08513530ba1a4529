"""A real browser (Debian's chromium driven by Playwright) uses every tab of the app and saves a screenshot of
each to tests/screenshots/ (BLIP2_SCREENSHOTS=docs/screenshots refreshes the ones the README shows)."""

import os
import shutil

import pytest

import app_support as S


CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = os.path.join(S.ROOT, os.environ.get("BLIP2_SCREENSHOTS", os.path.join("tests", "screenshots")))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with S.one_thread():
        yield


@pytest.fixture(scope="module")
def page():
    from playwright import sync_api  # a test requirement (requirements-dev.txt): missing means failed, not skipped

    assert os.path.exists(CHROMIUM), f"chromium is not installed ({CHROMIUM} missing): apt-get install chromium"
    server = S.get_server()
    os.makedirs(SHOTS, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(server.url)
        page.wait_for_selector("#caption-run")
        yield page
        browser.close()


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
    """Wait until no event is pending (Gradio shows a progress/eta element meanwhile). Call it once an output of
    the event has appeared, so the event has started."""
    page.wait_for_function("() => !document.querySelector('.progress-text, .eta-bar, .meta-text-center')",
                           timeout=60_000)


def shot(page, name):
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
    page.get_by_text("not a file this app can read", exact=False).first.wait_for()


def test_chat_tab(page, scene_files):
    scene, path = scene_files[1]
    o = scene.objects[0]
    tab(page, "Visual chat")
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
    tab(page, "Image-text matching")
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
    shot(page, "matching.png")


def test_search_tab(page, scene_files):
    target, _ = scene_files[3]
    tab(page, "Search")
    page.locator("#search-gallery input[type=file]").set_input_files([p for _, p in scene_files])
    page.wait_for_function("() => document.querySelectorAll('#search-gallery img').length >= 4")
    page.fill("#search-query textarea, #search-query input", target.caption())
    page.click("#search-run")
    page.wait_for_function("() => document.querySelectorAll('#search-results img').length >= 4")
    idle(page)
    assert "#1 · ITC" in page.locator("#search-results").inner_text()
    table = page.locator("#search-table").inner_text()
    assert all(f"scene{i}.png" in table for i in range(len(scene_files))), table
    first = page.locator('#search-table [role=row][aria-rowindex="2"]').first.inner_text()
    assert "scene3.png" in first, first
    shot(page, "search.png")


def test_example_gallery_and_about(page):
    tab(page, "Search")
    page.click("#search-examples")
    page.wait_for_function("() => document.querySelectorAll('#search-gallery img').length >= 8")
    tab(page, "About & API")
    page.get_by_text("/caption").first.wait_for()
    shot(page, "about.png")
