"""The web page (/ui) in a real headless browser: Debian's chromium driven by Selenium, against `bentoml serve`.

The server has API keys on (the `keyed_server` fixture): the page must work with them. The browser
tests skip, saying why, only when no chromium or chromedriver can be found (`./dev.sh setup` installs
Debian's `chromium` and `chromium-driver` as root); the checks of the page's files and headers run
without a browser.

    PNEUMONIA_UI_SCREENSHOT=docs/img/ui.png ./dev.sh test tests/test_ui.py   # also refreshes the screenshot
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from harness import dicom_files as D
from harness.paths import ROOT
from harness.payloads import sample_xrays
from harness.servers import ServerProcess
from serving.http.responses import DOCS_CSP, UI_CSP
from tests.conftest import API_KEY
from tests.images import encode

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT_ENV = "PNEUMONIA_UI_SCREENSHOT"
WAIT_S = 90  # generous: an explanation takes well under a second, but the machine may be shared


# ---------------------------------------------------------------- without a browser


def test_the_page_is_served_open_with_a_strict_csp_and_only_its_own_files(keyed_server: ServerProcess) -> None:
    page = httpx.get(keyed_server.url + "/ui/", timeout=30)  # no API key: the page asks for it itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == UI_CSP
    assert "'unsafe-inline'" not in UI_CSP and "http" not in UI_CSP
    # relative: Starlette's was built from the Host header (a helper's find: a forged one sent the browser there)
    moved = httpx.get(keyed_server.url + "/ui?x=1", headers={"host": "evil.example"}, timeout=30)
    assert moved.status_code == 307 and moved.headers["location"] == "ui/?x=1", moved.headers
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert set(references) >= {"style.css", "app.js"}
    for reference in references:  # nothing from another origin (no CDN): the page works offline
        assert not re.match(r"^(https?:)?//", reference), reference
        if not reference.startswith(("#", "data:")):
            asset = httpx.get(f"{keyed_server.url}/ui/{reference}", timeout=30)
            assert asset.status_code == 200 and asset.headers["content-security-policy"] == UI_CSP, reference
    script = (ROOT / "serving" / "ui" / "static" / "app.js").read_text()
    assert not re.search(r"https?://", script) and "sessionStorage" in script and "localStorage" not in script
    assert "not a localisation of disease" in page.text and "Medical disclaimer" in page.text


# ---------------------------------------------------------------- in chromium


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("no Chromium for the browser tests: chromium and chromedriver are not on PATH "
                    "(./dev.sh setup installs Debian's chromium and chromium-driver when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1000,1700",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER, log_output=str(log)))
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()  # ends chromium and chromedriver


def wait_for(driver: object, condition, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def open_page(driver, server: ServerProcess, key: str | None) -> None:
    from selenium.webdriver.common.by import By

    driver.get(server.url + "/ui/")
    wait_for(driver, lambda d: d.find_element(By.ID, "key-status").text)
    if key is not None:
        field = driver.find_element(By.ID, "api-key")
        field.clear()
        field.send_keys(key)
        driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
        wait_for(driver, lambda d: "A key is set" in d.find_element(By.ID, "key-status").text)


def upload(driver, path: Path):
    """Choose `path` in the file picker; the new result card once the page has finished with it."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, "#results > li"))
    driver.find_element(By.ID, "files").send_keys(str(path))
    card = wait_for(driver, lambda d: (d.find_elements(By.CSS_SELECTOR, "#results > li")[before:] or [None])[0])
    wait_for(driver, lambda d: card.get_attribute("data-state") in ("done", "refused", "error"))
    return card


def visible_text(card, selector: str) -> str:
    from selenium.webdriver.common.by import By

    element = card.find_element(By.CSS_SELECTOR, selector)
    return element.text if element.is_displayed() else ""


def test_an_xray_shows_the_api_s_verdict_and_a_heatmap_with_an_opacity_slider(
    browser, keyed_server: ServerProcess
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    xray = sample_xrays(1, offset=120)[1]  # a real X-ray (PNEUMONIA folder)
    expected = httpx.post(keyed_server.url + "/explain", files={"image": (xray.name, xray.read_bytes())},
                          headers={"x-api-key": API_KEY}, timeout=120).json()["prediction"]
    open_page(browser, keyed_server, API_KEY)
    card = upload(browser, xray)
    assert card.get_attribute("data-state") == "done", visible_text(card, ".error")

    assert visible_text(card, ".label") == expected["label"]
    assert visible_text(card, ".probability") == f"{expected['probability']:.4f}"
    assert visible_text(card, ".threshold") == f"{expected['threshold']:.4f}"
    assert float(card.get_attribute("data-probability")) == expected["probability"]
    assert visible_text(card, ".model") == expected["model"]
    assert visible_text(card, ".file-name") == xray.name

    overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
    base = card.find_element(By.CSS_SELECTOR, "img.base")
    for image in (overlay, base):  # decoded and rendered, not a broken image
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
        assert image.is_displayed()
    assert "not a localisation" in visible_text(card, ".note")

    slider = card.find_element(By.CSS_SELECTOR, "input.opacity")
    opacity = lambda: float(browser.execute_script("return getComputedStyle(arguments[0]).opacity", overlay))  # noqa: E731
    assert opacity() == pytest.approx(0.70)
    slider.send_keys(Keys.LEFT, Keys.LEFT)  # the keyboard moves it: 5 % a step
    assert opacity() == pytest.approx(0.60)
    assert visible_text(card, ".opacity-value") == "60%"
    slider.send_keys(Keys.HOME)
    assert opacity() == pytest.approx(0.0)
    slider.send_keys(Keys.END)
    assert opacity() == pytest.approx(1.0)
    assert expected["label"] in browser.find_element(By.ID, "progress").text  # announced (aria-live)


def test_a_refused_upload_shows_its_reason(browser, keyed_server: ServerProcess, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    blank = tmp_path / "blank.png"
    blank.write_bytes(encode(Image.new("L", (320, 300), 128), "PNG"))
    expected = httpx.post(keyed_server.url + "/explain", files={"image": ("blank.png", blank.read_bytes())},
                          headers={"x-api-key": API_KEY}, timeout=120).json()
    card = upload(browser, blank)  # the page of the test above, key still set in the tab
    assert card.get_attribute("data-state") == "refused"
    assert visible_text(card, ".refusal-message") == expected["prediction"]["refusal"]["message"]
    assert visible_text(card, ".refusal-reason") == "blank"
    assert visible_text(card, ".no-heatmap") == expected["note"]
    assert not card.find_element(By.CSS_SELECTOR, ".heatmap").is_displayed()
    assert not card.find_element(By.CSS_SELECTOR, ".verdict").is_displayed()
    if os.environ.get(SCREENSHOT_ENV):
        save_screenshot(browser, ROOT / os.environ[SCREENSHOT_ENV])


def test_a_dicom_file_shows_its_verdict_and_heatmap_and_a_lateral_one_its_refusal(
    browser, keyed_server: ServerProcess, tmp_path: Path
) -> None:
    """DICOM through the page's file picker: a real X-ray stored as a 12-bit MONOCHROME1 CR (.dcm) gets the API's
    verdict and a rendered heatmap; the same pixels tagged as a lateral view (.dicom) get their refusal."""
    from selenium.webdriver.common.by import By

    gray = np.asarray(Image.open(sample_xrays(1, offset=122)[1]).convert("L"))
    stored = D.stored_values(gray, 12, monochrome1=True)
    common = dict(bits_stored=12, photometric="MONOCHROME1", modality="CR", window=(stored.center, stored.width))
    study, lateral = tmp_path / "study.dcm", tmp_path / "lateral.dicom"
    study.write_bytes(D.part10(stored.values, syntax=D.SYNTAXES["jpeg-ls"], **common))
    lateral.write_bytes(D.part10(stored.values, view="LL", **common))
    open_page(browser, keyed_server, API_KEY)
    accept = browser.find_element(By.ID, "files").get_attribute("accept").split(",")
    assert {".dcm", ".dicom", "application/dicom"} <= set(accept)

    expected = httpx.post(keyed_server.url + "/explain", files={"image": (study.name, study.read_bytes())},
                          headers={"x-api-key": API_KEY}, timeout=120).json()["prediction"]
    assert expected["status"] == "ok" and expected["image"]["format"] == "DICOM", expected
    card = upload(browser, study)
    assert card.get_attribute("data-state") == "done", visible_text(card, ".error")
    assert visible_text(card, ".label") == expected["label"]
    assert visible_text(card, ".probability") == f"{expected['probability']:.4f}"
    overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0

    card = upload(browser, lateral)
    assert card.get_attribute("data-state") == "refused"
    assert visible_text(card, ".refusal-reason") == "dicom_view"
    assert not card.find_element(By.CSS_SELECTOR, ".heatmap").is_displayed()


def test_clearing_cancels_the_files_still_waiting(browser, keyed_server: ServerProcess) -> None:
    """Found by a helper: "Clear the results" emptied the page but every chosen file was still sent, the status
    line then announced results no longer shown, and the next file waited behind them."""
    import time

    from selenium.webdriver.common.by import By

    open_page(browser, keyed_server, API_KEY)
    browser.find_element(By.ID, "clear").click()
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in sample_xrays(3, offset=130)))
    cards = wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results > li")) == 6 or None)
    assert cards
    browser.find_element(By.ID, "clear").click()
    progress = browser.find_element(By.ID, "progress")
    cleared = progress.text
    assert re.fullmatch(r"Cleared; \d X-rays? not yet answered (was|were) cancelled\.", cleared), cleared
    time.sleep(6)  # six explanations would each have announced their result by now (well under a second each)
    assert progress.text == cleared and not browser.find_elements(By.CSS_SELECTOR, "#results > li")
    card = upload(browser, sample_xrays(1, offset=140)[0])  # sent at once, not behind the cleared files
    assert card.get_attribute("data-state") == "done" and len(browser.find_elements(By.CSS_SELECTOR, "#results > li")) == 1


def test_clearing_ends_a_wait_before_a_retry_and_counts_each_file_once(browser, keyed_server: ServerProcess) -> None:
    """Found by a review of the test above's fix: a file waiting out a 503's Retry-After (30 s here) still held the
    next upload for the whole wait after "Clear the results", and a second Clear counted it again."""
    import time

    from selenium.webdriver.common.by import By

    open_page(browser, keyed_server, API_KEY)
    _first_explain_answered(browser, 503, {"error": "busy"}, retry_after_s=30)  # busy, retry after 30 s
    xrays = sample_xrays(1, offset=150)
    browser.find_element(By.ID, "files").send_keys(str(xrays[0]))
    wait_for(browser, lambda d: "trying again in 30 s" in d.find_element(By.CSS_SELECTOR, "#results > li .state").text)
    clear = browser.find_element(By.ID, "clear")
    clear.click()
    assert browser.find_element(By.ID, "progress").text == "Cleared; 1 X-ray not yet answered was cancelled."
    clear.click()
    assert browser.find_element(By.ID, "progress").text == "No X-rays yet."
    started = time.monotonic()
    card = upload(browser, xrays[1])
    assert card.get_attribute("data-state") == "done"
    assert time.monotonic() - started < 25, "the new file waited behind the cleared one's 30 s retry"


def _answering_with(browser, changes_js: str) -> None:
    """Let the page's next /explain calls reach the real server, then change its answer in the page (`changes_js`
    edits `body`): the page's display of answers the server does not give on demand is what is under test."""
    browser.execute_script("""
      const real = window.__realFetch || window.fetch;
      window.__realFetch = real;
      window.fetch = async (url, options) => {
        const response = await real(url, options);
        if (!String(url).endsWith("/explain") || !response.ok) return response;
        const body = await response.json();
        """ + changes_js + """
        return new Response(JSON.stringify(body), {status: 200, headers: {"Content-Type": "application/json"}});
      };""")


def _first_explain_answered(browser, status: int, body: dict, retry_after_s: int) -> None:
    """The page's next /explain call gets this answer (with Retry-After) instead of the server's, the calls after it
    the server's own: how the page waits and retries on statuses the server does not give on demand is under test."""
    browser.execute_script("""
      const [status, body, wait] = arguments;
      window.__realFetch = window.__realFetch || window.fetch;
      let first = true;
      window.fetch = (url, options) => {
        if (first && String(url).endsWith("/explain")) {
          first = false;
          return Promise.resolve(new Response(JSON.stringify(body),
            {status, headers: {"Retry-After": String(wait), "Content-Type": "application/json"}}));
        }
        return window.__realFetch(url, options);
      };""", status, body, retry_after_s)


def test_the_verdict_and_its_numbers_never_disagree_near_the_threshold(browser, keyed_server: ServerProcess) -> None:
    """A helper's find: an image just above the threshold showed "Verdict: PNEUMONIA, probability 0.5126 against
    the threshold 0.5126 (below it: NORMAL)": the side text was recomputed from the rounded numbers, four decimals
    each. It comes from the verdict now, and the numbers get the digits it takes to tell them apart."""
    xray = sample_xrays(1, offset=123)[1]
    open_page(browser, keyed_server, API_KEY)
    cases = (("PNEUMONIA", 0.512608, "0.512608", "0.512607", "at or above it: PNEUMONIA"),
             ("PNEUMONIA", 0.512607, "0.51260700", "0.51260704", "at or above it: PNEUMONIA"),  # served before
             ("NORMAL", 0.512606, "0.512606", "0.512607", "below it: NORMAL"),
             ("NORMAL", 0.512607, "0.51260700", "0.51260704", "below it: NORMAL"),  # rounded down to 6 digits
             ("NORMAL", 0.31, "0.3100", "0.5126", "below it: NORMAL"))
    for label, probability, shown, threshold, side in cases:
        _answering_with(browser, f"""Object.assign(body.prediction, {{label: "{label}", probability: {probability},
                                     threshold: 0.5126070380210876}});""")
        card = upload(browser, xray)
        assert card.get_attribute("data-state") == "done", visible_text(card, ".error")
        assert (visible_text(card, ".label"), visible_text(card, ".probability"), visible_text(card, ".threshold"),
                visible_text(card, ".side")) == (label, shown, threshold, side)
    browser.execute_script("window.fetch = window.__realFetch;")


def test_files_that_cannot_be_read_keys_the_server_refuses_and_late_answers_say_so(browser, keyed_server: ServerProcess,
                                                                                  tmp_path: Path) -> None:
    """A helper's finds: a file deleted (or a folder dropped) before its turn, and a key with a typographic dash,
    all showed "Cannot reach the server"; a server that stopped answering left "Sending the image…" for good and
    every later file behind it."""
    from selenium.webdriver.common.by import By

    open_page(browser, keyed_server, API_KEY)
    field = browser.find_element(By.ID, "api-key")
    field.send_keys("abcdefghijklmnop\u20130123")  # an en dash, as word processors paste it
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    assert browser.find_element(By.ID, "key-status").text.startswith("Not used: an API key is at least 16")
    assert browser.execute_script("return sessionStorage.getItem('pneumonia-api-key')") == API_KEY  # kept
    field.clear()

    # The first file's request waits for the test; the second file is deleted meanwhile.
    browser.execute_script("""
      window.__realFetch = window.__realFetch || window.fetch;
      window.__hold = new Promise((resolve) => { window.__release = resolve; });
      window.fetch = async (url, options) => { await window.__hold; return window.__realFetch(url, options); };""")
    first, doomed = sample_xrays(1, offset=124)[0], tmp_path / "moved.jpeg"
    doomed.write_bytes(first.read_bytes())
    browser.find_element(By.ID, "files").send_keys(f"{first}\n{doomed}")
    cards = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results > li")[-2:]
                     if d.find_elements(By.CSS_SELECTOR, "#results > li[data-state=working]") else None)
    doomed.unlink()
    browser.execute_script("window.__release();")
    wait_for(browser, lambda d: cards[1].get_attribute("data-state") == "error")
    assert cards[0].get_attribute("data-state") == "done"
    assert visible_text(cards[1], ".error").startswith("This could not be read: a folder"), visible_text(cards[1], ".error")

    # A server that does not answer: the page gives up after its timeout (1.5 s here) and goes on.
    browser.execute_script("""
      document.documentElement.dataset.requestTimeoutMs = "1500";
      window.fetch = (url, options) => new Promise((_, reject) => options.signal.addEventListener("abort",
        () => reject(options.signal.reason)));""")
    stuck = upload(browser, first)
    assert visible_text(stuck, ".error").startswith("The server did not answer within 2 s."), visible_text(stuck, ".error")
    browser.execute_script("window.fetch = window.__realFetch; delete document.documentElement.dataset.requestTimeoutMs;")
    assert upload(browser, first).get_attribute("data-state") == "done"


def test_a_rate_limited_file_waits_as_asked_and_files_dropped_anywhere_are_explained(browser,
                                                                                    keyed_server: ServerProcess) -> None:
    """A helper's finds: at 429 the page failed its own queued files at once instead of waiting the server's
    Retry-After, as it does for 503; files dropped beside the dashed zone (on the results) vanished without a word;
    every card's slider had the same accessible name."""
    import base64

    from selenium.webdriver.common.by import By

    open_page(browser, keyed_server, API_KEY)
    # the first answer: this browser is over its rate limit, retry after 1 s
    _first_explain_answered(browser, 429, {"detail": [{"type": "rate_limited", "msg": "slow down"}]}, retry_after_s=1)
    xray = sample_xrays(1, offset=125)[0]
    browser.find_element(By.ID, "files").send_keys(str(xray))
    card = wait_for(browser, lambda d: (d.find_elements(By.CSS_SELECTOR, "#results > li") or [None])[-1])
    wait_for(browser, lambda d: "rate limit; trying again in 1 s" in card.text or card.get_attribute("data-state") != "working")
    wait_for(browser, lambda d: card.get_attribute("data-state") in ("done", "error"))
    assert card.get_attribute("data-state") == "done", visible_text(card, ".error")
    browser.execute_script("window.fetch = window.__realFetch;")

    before = len(browser.find_elements(By.CSS_SELECTOR, "#results > li"))
    browser.execute_script("""
      const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
      const files = new DataTransfer();
      files.items.add(new File([bytes], "dropped.jpeg", {type: "image/jpeg"}));
      document.getElementById("results-heading").dispatchEvent(
        new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));""",
                           base64.b64encode(xray.read_bytes()).decode())
    dropped = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results > li")[before:] or None)[0]
    wait_for(browser, lambda d: dropped.get_attribute("data-state") in ("done", "refused", "error"))
    assert visible_text(dropped, ".file-name") == "dropped.jpeg" and dropped.get_attribute("data-state") == "done"
    names = browser.execute_script(
        "return Array.from(document.querySelectorAll('#results input.opacity')).map(s => s.getAttribute('aria-label'))")
    assert names == [f"Heatmap opacity for {xray.name}", "Heatmap opacity for dropped.jpeg"], names


def test_a_missing_or_wrong_api_key_gets_a_message_a_person_can_act_on(browser, keyed_server: ServerProcess) -> None:
    xray = sample_xrays(1, offset=121)[0]
    open_page(browser, keyed_server, None)
    browser.find_element("id", "forget-key").click()
    card = upload(browser, xray)
    assert card.get_attribute("data-state") == "error"
    assert visible_text(card, ".error") == "This server needs an API key. Enter it above, then choose the file again."
    open_page(browser, keyed_server, "not-the-right-key-0000")
    card = upload(browser, xray)
    assert visible_text(card, ".error").startswith("The server did not accept the API key.")
    browser.find_element("id", "forget-key").click()


def test_the_page_says_what_the_gate_does_uses_a_typed_key_and_announces_warnings(browser, keyed_server: ServerProcess,
                                                                                 tmp_path: Path) -> None:
    """A helper's finds on the page: with the validity gate off a black image got "PNEUMONIA 0.99" under the page's
    promise that such images are refused; a key typed and not yet used was not sent and the 401 asked for it; a
    browser blocking site data could not set a key at all; warnings (low resolution) were shown but never
    announced; a right-to-left override in a file name reversed the announced numbers; a server still starting
    was called "busy"; an empty file read "The file is empty. (the file is empty (0 bytes))"."""
    import base64

    from selenium.webdriver.common.by import By

    open_page(browser, keyed_server, None)
    notice = browser.find_element(By.ID, "gate-notice")
    health = httpx.post(keyed_server.url + "/health", timeout=30).json()["validity"]
    assert health == {**health, "mode": "refuse", "fitted": True} and not notice.is_displayed()  # the real server
    browser.execute_script("""
      window.__realFetch = window.__realFetch || window.fetch;
      window.fetch = async (url, options) => {
        const response = await window.__realFetch(url, options);
        if (String(url).endsWith("/health")) window.__healthStatus = response.status;
        return response;
      };""")
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait_for(browser, lambda d: d.execute_script("return window.__healthStatus") == 200)  # it did ask the server
    for validity, said in (({"mode": "off", "fitted": True}, "This server's validity gate is off"),
                           ({"mode": "warn", "fitted": True}, "This server's validity gate only warns"),
                           ({"mode": "refuse", "fitted": False}, "has no validity gate"),
                           ({"mode": "refuse", "fitted": True}, None)):
        browser.execute_script("""
          window.__realFetch = window.__realFetch || window.fetch;
          window.fetch = (url, options) => String(url).endsWith("/health")
            ? Promise.resolve(new Response(JSON.stringify({validity: arguments[0]}), {status: 200}))
            : window.__realFetch(url, options);""", validity)
        browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()  # the page reads it again
        if said:
            wait_for(browser, lambda d: said in notice.text)
        else:
            wait_for(browser, lambda d: not notice.is_displayed())
    browser.execute_script("window.fetch = window.__realFetch;")

    # Every text the live region is given, in order (a retry's lasts a second).
    browser.execute_script("""
      window.__said = [];
      new MutationObserver(() => window.__said.push(document.getElementById("progress").textContent))
        .observe(document.getElementById("progress"), {childList: true, characterData: true, subtree: true});""")

    # A key typed and not used yet is used by choosing a file; one that cannot be a key is not sent, and said so.
    browser.find_element(By.ID, "forget-key").click()
    field = browser.find_element(By.ID, "api-key")
    field.send_keys("too-short")
    xray = sample_xrays(1, offset=126)[0]
    card = upload(browser, xray)
    assert visible_text(card, ".error").startswith("The key typed above is not an API key"), visible_text(card, ".error")
    field.clear()
    field.send_keys(API_KEY)
    small, blank = tmp_path / "small.png", tmp_path / "blank.png"
    Image.open(xray).convert("L").resize((100, 100)).save(small)
    Image.new("L", (100, 100), 128).save(blank)
    card = upload(browser, small)
    assert card.get_attribute("data-state") == "done", visible_text(card, ".error")
    assert browser.find_element(By.ID, "key-status").text == "A key is set for this tab."
    progress = browser.find_element(By.ID, "progress").text
    assert "Warning: low resolution (100x100)" in progress, progress  # announced, not only shown
    card = upload(browser, blank)
    progress = browser.find_element(By.ID, "progress").text
    assert card.get_attribute("data-state") == "refused" and "(blank)" in progress and "Warning: low resolution" in progress

    # A name with a right-to-left override is isolated from the sentence; a server still starting says so.
    _first_explain_answered(browser, 503, {"detail": [{"type": "not_ready", "msg": "loading"}]}, retry_after_s=1)
    browser.execute_script("""
      const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
      const files = new DataTransfer();
      files.items.add(new File([bytes], "\u202epatient.jpeg", {type: "image/jpeg"}));
      window.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));""",
                           base64.b64encode(xray.read_bytes()).decode())
    card = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results > li")[-1])
    wait_for(browser, lambda d: card.get_attribute("data-state") == "done")
    said = browser.execute_script("return window.__said")
    assert "\u2068\u202epatient.jpeg\u2069: the server is still starting; trying again in 1 s." in said, said
    progress = browser.find_element(By.ID, "progress").get_attribute("textContent")
    assert progress.startswith("\u2068\u202epatient.jpeg\u2069: "), repr(progress)
    browser.execute_script("window.fetch = window.__realFetch;")

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    card = upload(browser, empty)
    assert visible_text(card, ".error") == "The file is empty (0 bytes).", visible_text(card, ".error")

    # A browser that blocks site data: the key is kept by the page itself, and said so.
    browser.execute_script("""
      Object.defineProperty(window, "sessionStorage", {configurable: true,
        get() { throw new DOMException("blocked", "SecurityError"); }});""")
    field = browser.find_element(By.ID, "api-key")
    field.send_keys(API_KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    assert browser.find_element(By.ID, "key-status").text.startswith("A key is set for this tab. This browser does "
                                                                     "not let the page keep it")
    assert upload(browser, xray).get_attribute("data-state") == "done"
    browser.refresh()  # the real storage again, for the tests after this one


def test_controls_are_labelled_focus_is_visible_and_text_has_contrast(browser, keyed_server: ServerProcess) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, keyed_server, None)
    unlabelled = browser.execute_script(
        "return Array.from(document.querySelectorAll('input')).filter(i => !i.labels || !i.labels.length)"
        ".map(i => i.id || i.name || i.type)")
    assert unlabelled == []
    # Keyboard: Tab from the key field reaches the buttons, which show a visible focus outline.
    browser.find_element(By.ID, "api-key").click()
    browser.switch_to.active_element.send_keys(Keys.TAB)
    focused = browser.switch_to.active_element
    assert focused.text == "Use this key"
    outline = browser.execute_script("const s = getComputedStyle(arguments[0]); return [s.outlineStyle, s.outlineWidth]",
                                     focused)
    assert outline[0] != "none" and float(outline[1].removesuffix("px")) >= 2
    ratios = browser.execute_script(CONTRAST_JS, ["h1", "h2", ".disclaimer", ".hint", "button", "label", "p"])
    low = {selector: ratio for selector, ratio in ratios.items() if ratio < 4.5}
    assert not low, low  # WCAG AA for normal text


# WCAG contrast of each selector's first visible element: its text colour against the first opaque background up
# its ancestors.
CONTRAST_JS = """
const lum = (rgb) => { const c = rgb.map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]; };
const parse = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
const out = {};
for (const selector of arguments[0]) {
  const el = Array.from(document.querySelectorAll(selector)).find(e => e.offsetParent !== null);
  if (!el) continue;
  const fg = parse(getComputedStyle(el).color);
  let node = el, bg = [255, 255, 255];
  while (node && node.nodeType === 1) {
    const c = parse(getComputedStyle(node).backgroundColor);
    if (c.length === 3 || (c.length === 4 && c[3] > 0.99)) { bg = c.slice(0, 3); break; }
    node = node.parentElement;
  }
  const [a, b] = [lum(fg.slice(0, 3)), lum(bg)].sort((x, y) => y - x);
  out[selector] = (a + 0.05) / (b + 0.05);
}
return out;
"""


def save_screenshot(driver, path: Path) -> None:
    """The whole page as a person sees it (the window stretched to its height, so the refused card below the
    heatmap is in it too), reduced to a small palette PNG for the docs."""
    size = driver.get_window_size()
    frame = size["height"] - driver.execute_script("return window.innerHeight")  # the window's own bars, if any
    page = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], max(size["height"], page + frame))
    try:
        picture = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    finally:
        driver.set_window_size(size["width"], size["height"])
    picture = picture.resize((picture.width * 3 // 4, picture.height * 3 // 4), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def test_the_docs_page_runs_swagger_but_no_third_party_script(browser, keyed_server: ServerProcess) -> None:
    """Found by a helper: BentoML's docs page at / carries an inline Google Tag Manager loader. It ran in the
    service's origin, where a key typed into the web page sits in sessionStorage, and every visit called Google.
    Swagger UI (its own files) still renders the API; the inline script and every other origin are blocked."""
    from selenium.webdriver.common.by import By

    page = httpx.get(keyed_server.url + "/", timeout=30)
    assert page.headers["content-security-policy"] == DOCS_CSP and "googletagmanager" in page.text  # BentoML's page
    open_page(browser, keyed_server, API_KEY)  # the key in this tab's sessionStorage, as a user leaves it
    browser.get(keyed_server.url + "/")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))  # Swagger UI ran and read the schema
    assert "/classify" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui").text
    assert browser.execute_script("return typeof window.google_tag_manager + ' ' + typeof window.dataLayer") == \
        "undefined undefined"
    # BentoML's badges (img.shields.io) are refused by the browser itself, not only unreachable from here
    elsewhere = browser.execute_script("return [...document.images].map(i => i.src).filter(u => !u.startsWith("
                                       "location.origin + '/') && !u.startsWith('data:'))")
    refused = " ".join(entry["message"] for entry in browser.get_log("browser"))
    assert elsewhere and """directive: "img-src 'self' data:". The action has been blocked""" in refused
    assert "Executing inline script violates the following Content Security Policy directive" in refused
    assert all(url.split("?")[0] in refused for url in elsewhere), (elsewhere, refused)


def test_the_page_reflows_at_320_css_pixels(browser, keyed_server: ServerProcess) -> None:
    """WCAG 1.4.10 (reflow): found by a helper, the page was 388 px wide in a 320 px viewport (the key field's
    18rem minimum, the opacity row of a result card) and scrolled sideways."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 320, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    try:
        open_page(browser, keyed_server, API_KEY)
        upload(browser, sample_xrays(1, offset=122)[0])
        width = browser.execute_script("return document.documentElement.clientWidth")  # 320 less a scroll bar
        assert 280 <= width <= 320 and browser.execute_script("return document.documentElement.scrollWidth") <= width
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
