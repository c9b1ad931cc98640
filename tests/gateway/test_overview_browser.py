"""The reviewer overview in a real headless Chromium: the charts render (laid out, with lines and
the guards' legends), the window selector reloads the page, and a screenshot is a real image."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.fake import FakeBackendThread
from tests.browser import chromium, needs_chromium
from tests.conftest import make_settings
from tests.helpers import create_key, serving

pytestmark = [pytest.mark.slow, needs_chromium]


def test_overview_charts_render_in_chromium(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import Select, WebDriverWait

    settings = make_settings(tmp_path, fake_backend.url)
    _, reviewer_key = create_key(settings, "reviewer", "rita")
    with serving(settings) as (gw, client):
        for _ in range(3):
            client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "a question"}])
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}],
            extra_body={"fake": {"answer": "You are a stupid idiot."}},
        )  # fmt: skip
        driver = chromium("--window-size=1200,1600")
        try:
            wait = WebDriverWait(driver, 20)
            driver.get(gw.url + "/review/overview")  # not signed in: sent to the login page
            wait.until(until.presence_of_element_located((By.ID, "key")))
            driver.find_element(By.ID, "key").send_keys(reviewer_key)
            driver.find_element(By.ID, "sign-in").click()
            wait.until(until.presence_of_element_located((By.ID, "requests")))  # signed in: the list
            driver.get(gw.url + "/review/overview")
            wait.until(until.presence_of_element_located((By.CSS_SELECTOR, "#charts svg")))
            charts = driver.find_elements(By.CSS_SELECTOR, "#charts svg")
            assert len(charts) == 5  # requests, block rate, flag rate, latency, drift
            for chart in charts:  # laid out by the browser, not collapsed
                assert chart.size["width"] > 300 and chart.size["height"] > 100
            assert driver.find_elements(By.CSS_SELECTOR, "#charts polyline, #charts circle")  # data drawn
            totals = driver.find_element(By.ID, "totals").text
            assert "4" in totals.split()  # four requests in the window
            shot = driver.get_screenshot_as_png()
            (tmp_path / "overview.png").write_bytes(shot)
            assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000

            Select(driver.find_element(By.NAME, "window")).select_by_value("7d")
            driver.find_element(By.CSS_SELECTOR, "form.filters button").click()
            wait.until(until.url_contains("window=7d"))
            wait.until(until.presence_of_element_located((By.CSS_SELECTOR, "#charts svg")))
            assert len(driver.find_elements(By.CSS_SELECTOR, "#charts svg")) == 5
        finally:
            driver.quit()
