"""The search page in a real browser: a worker and a query server on the embedded broker, headless Debian
chromium driven by Selenium. Search by a stored id (Enter), by an uploaded file and by a random item;
thumbnails load; the live panel follows ingestion; the page fits a phone-width window."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.records import encode_png
from streamhash.services.processes import spawn
from tests.support import env_for, module_kafka, produce, start_worker, stop, wait_for, wait_http

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
N = 300
SEED = 11
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "search-page.png"

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"needs Debian's chromium and chromedriver at {CHROMIUM} and {CHROMEDRIVER} "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait


@pytest.fixture(scope="module")
def system(broker, tmp_path_factory):
    """A worker and a query server over one store, with N labeled images indexed."""
    tmp = tmp_path_factory.mktemp("browser")
    kafka = module_kafka(broker, "browser")
    env = env_for(kafka, tmp / "index", free_port(), free_port())
    worker, _ = start_worker(env, tmp / "worker.log")
    server = spawn(["serve"], env=env, log_path=tmp / "serve.log")
    base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
    try:
        wait_http(f"{base}/healthz", 60, server, tmp / "serve.log")
        produce(kafka, N, "img-", seed=SEED)
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= N, 90, f"{N} items in the query index")
        yield {"base": base, "kafka": kafka}
    finally:
        stop(server)
        stop(worker)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, predicate, what: str, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: predicate(d), message=what)


def hits(driver) -> list[dict]:
    """The rendered results: id, distance, caption, and whether the thumbnail loaded."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#results li.hit')].map(li => {
            const img = li.querySelector('img');
            return {id: li.dataset.id, distance: Number(li.dataset.distance), text: li.innerText,
                    loaded: img.complete && img.naturalWidth > 0};
        });""")


def wait_for_results(driver, k: int, first_id: str | None = None) -> list[dict]:
    def ready(d):
        got = hits(d)
        return got if len(got) == k and all(h["loaded"] for h in got) and (first_id is None or got[0]["id"] == first_id) else None

    return wait(driver, ready, f"{k} results with loaded thumbnails{' led by ' + first_id if first_id else ''}")


def open_page(driver, system) -> None:
    driver.get(system["base"] + "/")
    wait(driver, lambda d: d.find_element(By.ID, "live-items").text.isdigit(), "the live panel's first poll")


def set_k(driver, k: int) -> None:
    field = driver.find_element(By.ID, "k")
    field.clear()
    field.send_keys(str(k))


def test_search_by_a_stored_id_with_enter_puts_it_first(system, browser):
    open_page(browser, system)
    set_k(browser, 8)
    field = browser.find_element(By.ID, "item-id")
    field.send_keys("img-7", Keys.ENTER)  # Enter in the field submits the form
    got = wait_for_results(browser, 8, "img-7")
    assert got[0]["distance"] == 0
    assert [h["distance"] for h in got] == sorted(h["distance"] for h in got)
    assert all(f"d = {h['distance']}" in h["text"] and "labels" in h["text"] for h in got)
    summary = browser.find_element(By.ID, "summary").text
    assert "model version 1" in summary and "generation 1" in summary
    assert browser.execute_script("return document.getElementById('query-image').naturalWidth") > 0


def test_search_by_an_uploaded_file(system, browser, tmp_path):
    from tests.conftest import synthetic_images

    images, _ = synthetic_images(N, seed=SEED)  # what produce() sent: the upload equals img-42
    path = tmp_path / "query.png"
    path.write_bytes(encode_png(images[42]))
    open_page(browser, system)
    set_k(browser, 12)
    browser.find_element(By.ID, "file").send_keys(str(path))
    assert browser.find_element(By.ID, "by-image").is_selected()
    browser.find_element(By.ID, "search").click()
    got = wait_for_results(browser, 12)
    assert got[0]["distance"] == 0  # the same pixels as img-42: the same code
    assert browser.find_element(By.ID, "error").text == ""
    browser.save_screenshot(str(tmp_path / "search-by-upload.png"))


def test_a_random_stored_item_searches_itself(system, browser):
    open_page(browser, system)
    set_k(browser, 5)
    browser.find_element(By.ID, "random").click()
    wait(browser, lambda d: d.find_element(By.ID, "item-id").get_attribute("value"), "a random id")
    chosen = browser.find_element(By.ID, "item-id").get_attribute("value")
    assert chosen.startswith(("img-", "more-", "named-"))
    got = wait_for_results(browser, 5, chosen)
    assert got[0]["distance"] == 0


def test_the_live_panel_follows_ingestion(system, browser, tmp_path):
    open_page(browser, system)
    before = int(browser.find_element(By.ID, "live-items").text)
    assert before >= N
    produce(system["kafka"], 200, "more-", seed=SEED + 1)
    wait(browser, lambda d: int(d.find_element(By.ID, "live-items").text) >= before + 200, "the panel to count 200 more", 90)
    assert browser.find_element(By.ID, "live-model").text == "1"
    # a search for the picture: results, the query and the panel with the new count
    set_k(browser, 12)
    browser.find_element(By.ID, "item-id").send_keys("more-3", Keys.ENTER)
    wait_for_results(browser, 12, "more-3")
    shot = tmp_path / "search-page.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("STREAMHASH_UPDATE_SCREENSHOT"):  # the README's picture: refreshed on request only
        shutil.copyfile(shot, SCREENSHOT)


def test_the_page_fits_a_phone_width_window(system, browser):
    browser.set_window_size(390, 844)
    try:
        open_page(browser, system)
        browser.find_element(By.ID, "item-id").send_keys("img-1", Keys.ENTER)
        wait_for_results(browser, 12, "img-1")
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        wide = browser.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > "
            "window.innerWidth).slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + "
            "Math.round(e.getBoundingClientRect().right))")
        assert overflow <= 0, f"{overflow}px wider than a 390px window: {wide}"
    finally:
        browser.set_window_size(1280, 1000)


def test_hits_are_captioned_by_class_name(system, browser):
    """Names sent with the images (label-names) are kept with the index: captions say "seven", not "labels 7".
    Last in the module: once a label has a name, every item of that label is shown by it."""
    from tests.conftest import synthetic_images

    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    images, labels = synthetic_images(20, seed=SEED + 2)
    labels[:10] = np.arange(10)  # every class named, so every hit of the index has a name
    before = httpx.get(f"{system['base']}/healthz").json()["index_size"]
    producer = make_producer(system["kafka"])
    send(producer, system["kafka"].topic, from_arrays(images, labels, prefix="named-", fmt="npy", classes=names),
         progress=False)
    producer.close()
    wait_for(lambda: httpx.get(f"{system['base']}/healthz").json()["index_size"] >= before + 20, 60, "20 named items")
    open_page(browser, system)
    set_k(browser, 6)
    browser.find_element(By.ID, "item-id").send_keys("named-0", Keys.ENTER)
    got = wait_for_results(browser, 6, "named-0")
    assert names[labels[0]] in got[0]["text"]
    assert browser.find_element(By.ID, "query-caption").text == f"the query · {names[labels[0]]}"
    assert all("labels " not in h["text"] and any(n in h["text"] for n in names) for h in got)
