"""The reviewer UI in a real headless Chromium (Debian's chromium and chromedriver)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import create_key, serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="needs Debian's chromium and chromium-driver (setup.sh installs them when run as root)",
    ),
]


def test_sign_in_filter_open_label_reload(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import Select, WebDriverWait

    settings = make_settings(tmp_path, fake_backend.url)
    _, reviewer_key = create_key(settings, "reviewer", "rita")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)  # fmt: skip
    with serving(settings) as (gw, client):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "a fine question"}])
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}],
            extra_body={"fake": {"answer": "You are a stupid idiot."}},
        )  # fmt: skip
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(30)
            wait = WebDriverWait(driver, 20)  # a click that submits a form does not wait for the next page

            def page_with(url_part: str, css: str) -> None:
                wait.until(until.url_contains(url_part))
                wait.until(until.presence_of_element_located((By.CSS_SELECTOR, css)))

            driver.get(gw.url + "/review")  # not signed in: sent to the login page
            page_with("/review/login", "#key")
            driver.find_element(By.ID, "key").send_keys(reviewer_key)
            driver.find_element(By.ID, "sign-in").click()
            page_with("/review", "#requests")
            assert driver.current_url.endswith("/review")
            assert len(driver.find_elements(By.CSS_SELECTOR, "#requests a.open")) == 2

            Select(driver.find_element(By.ID, "status")).select_by_value("blocked")
            driver.find_element(By.ID, "apply").click()
            page_with("status=blocked", "#requests")
            links = driver.find_elements(By.CSS_SELECTOR, "#requests a.open")
            assert len(links) == 1

            links[0].click()
            page_with("/review/requests/", "#answer")
            assert "stupid idiot" in driver.find_element(By.ID, "answer").text
            detail_url = driver.current_url
            Select(driver.find_element(By.ID, "label")).select_by_value("toxic")
            driver.find_element(By.ID, "note").send_keys("abusive answer, correctly blocked")
            driver.find_element(By.ID, "save-label").click()
            wait.until(until.text_to_be_present_in_element((By.ID, "labels"), "abusive answer"))

            driver.get(detail_url)  # reload: the label is stored, not just shown
            page_with("/review/requests/", "#labels")
            labels = driver.find_element(By.ID, "labels").text
            assert "toxic" in labels and "abusive answer, correctly blocked" in labels
            driver.save_screenshot(str(tmp_path / "review.png"))
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
