"""The search page in a real browser: headless Chromium (Debian's chromium + chromium-driver) on `mocoplus serve`.

``make test`` installs both. ``MOCOPLUS_SCREENSHOT=docs/search-page.png`` saves
the page after an image search (the picture in docs/service.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from processes import start_server, stop, wait_listening

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 60
K = 6


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (`make test` installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,860"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=DriverService(driver_path), options=options)  # a local driver: no download
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(bundle, corpus, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process, url = start_server("--model", str(bundle), "--index", str(corpus["index"]), log=log)
    try:
        wait_listening(process, url)
        yield url
    finally:
        stop(process)


def wait_for(browser, condition, what: str):
    """``condition`` once it holds; an element the page replaced meanwhile (a re-render) is simply asked again."""
    try:
        return WebDriverWait(browser, WAIT_S, ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        status = browser.find_element(By.ID, "status").text
        error = browser.find_element(By.ID, "error").text
        pytest.fail(f"timed out waiting for {what}; status {status!r}, error {error!r}")


def open_page(browser, url: str) -> None:
    browser.get(url + "/")
    wait_for(browser, lambda b: b.find_element(By.ID, "file").is_enabled(), "the page to become ready")
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys(str(K))


def results(browser, first: str | None = None) -> list[dict[str, str]]:
    """The hit cards once all ``K`` are shown (the first one ``first``, when given), their images loaded."""

    def shown(b):
        cards = b.find_elements(By.CSS_SELECTOR, "#results .card.hit")
        if len(cards) != K:
            return False
        loaded = all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
                     for image in b.find_elements(By.CSS_SELECTOR, "#results .card.hit img"))  # fmt: skip
        hits = [{part: card.find_element(By.CLASS_NAME, part).text for part in ("key", "label", "score")}
                for card in cards]  # fmt: skip
        return hits if loaded and (first is None or hits[0]["key"] == first) else False

    return wait_for(browser, shown, f"{K} results with their images")


def test_an_uploaded_image_shows_k_neighbours_with_labels_and_scores(browser, served, corpus, tmp_path):
    key = corpus["keys"][11]
    picture = tmp_path / "query.png"
    picture.write_bytes(corpus["images"][key])
    open_page(browser, served)
    browser.find_element(By.ID, "file").send_keys(str(picture))
    hits = results(browser)
    assert hits[0]["key"] == key  # the corpus image itself is the nearest
    assert all(hit["label"] for hit in hits)  # class names, e.g. "Ankle boot"
    scores = [float(hit["score"]) for hit in hits]
    assert scores == sorted(scores, reverse=True)
    query = browser.find_element(By.CSS_SELECTOR, "#results .card.query img")
    assert browser.execute_script("return arguments[0].naturalWidth", query) > 0
    assert browser.find_element(By.ID, "error").text == ""
    screenshot = os.environ.get("MOCOPLUS_SCREENSHOT")
    if screenshot:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(screenshot)


def test_a_corpus_key_comes_back_first_and_random_searches_a_real_key(browser, served, corpus):
    open_page(browser, served)
    key = corpus["keys"][42]
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "key-search").click()
    assert results(browser, first=key)[0]["key"] == key

    browser.find_element(By.ID, "key").clear()
    browser.find_element(By.ID, "random").click()
    chosen = wait_for(browser, lambda b: b.find_element(By.ID, "key").get_attribute("value"), "a random key")
    assert chosen in corpus["keys"]
    assert results(browser, first=chosen)[0]["key"] == chosen  # its own image comes back first


def test_an_api_error_is_shown_as_its_one_line_message(browser, served):
    open_page(browser, served)
    browser.find_element(By.ID, "key").send_keys("no-such-key")
    browser.find_element(By.ID, "key-search").click()
    error = wait_for(browser, lambda b: b.find_element(By.ID, "error").text, "the error line")
    assert error == "error: no sample with key 'no-such-key' in the index"


def test_without_an_index_the_page_says_so(browser, bundle, tmp_path):
    process, url = start_server("--model", str(bundle), log=tmp_path / "serve.log")
    try:
        wait_listening(process, url)
        browser.get(url + "/")
        status = wait_for(browser, lambda b: "no index" in b.find_element(By.ID, "status").text, "the no-index note")
        assert status
        assert not browser.find_element(By.ID, "file").is_enabled()
    finally:
        stop(process)
