"""The reviewer UI in a real headless Chromium (Debian's chromium and chromedriver)."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from gateway.db import create_engine, feedback
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


def _options() -> tuple[Any, str]:
    from selenium import webdriver

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
    return options, profile


def test_sign_in_filter_open_label_reload(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import Select, WebDriverWait

    settings = make_settings(tmp_path, fake_backend.url)
    _, reviewer_key = create_key(settings, "reviewer", "rita")
    options, profile = _options()
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
            assert "a fine question" in driver.find_element(By.ID, "requests").text  # the prompt excerpt

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


def test_excerpts_rating_filter_feedback_and_label_history(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    """Issues 16 and 18: what the list says without opening a record, the rating filter, the
    feedback on the detail page, and a label set, changed and removed with its history kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import Select, WebDriverWait

    settings = make_settings(tmp_path, fake_backend.url)
    _, reviewer_key = create_key(settings, "reviewer", "rita")
    options, profile = _options()
    with serving(settings) as (gw, client):
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "How heavy is the Zorblat vacuum?"}],
            extra_body={"fake": {"answer": "It weighs 4.2 kg, battery included."}},
        )  # fmt: skip
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "Which filter fits the Zorblat 3000?"}],
            extra_body={"fake": {"answer": "The <b>HX-9</b> filter fits every model."}},
        )  # fmt: skip
        rated = raw.headers["x-gateway-request-id"]
        now = datetime.now(UTC)

        async def rate() -> None:
            engine = create_engine(settings.database_url)
            async with engine.begin() as conn:
                await conn.execute(insert(feedback), [
                    {"request_id": rated, "key_id": "key_app", "rating": -1, "comment": "HX-9 does not fit the 3000",
                     "categories_json": json.dumps(["wrong"]), "created_at": now},
                    {"request_id": rated, "key_id": "key_other", "rating": 0, "comment": None,
                     "categories_json": None, "created_at": now + timedelta(seconds=1)},
                ])  # fmt: skip
            await engine.dispose()

        asyncio.run(rate())
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(30)
            wait = WebDriverWait(driver, 20)

            def page_with(url_part: str, css: str) -> None:
                wait.until(until.url_contains(url_part))
                wait.until(until.presence_of_element_located((By.CSS_SELECTOR, css)))

            driver.get(gw.url + "/review/login")
            page_with("/review/login", "#key")
            driver.find_element(By.ID, "key").send_keys(reviewer_key)
            driver.find_element(By.ID, "sign-in").click()
            page_with("/review", "#requests")
            excerpts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#requests td.excerpt")]
            assert excerpts == [
                "Which filter fits the Zorblat 3000?\nThe <b>HX-9</b> filter fits every model.",
                "How heavy is the Zorblat vacuum?\nIt weighs 4.2 kg, battery included.",
            ]  # the answer's markup is shown as text, not rendered
            assert not driver.find_elements(By.CSS_SELECTOR, "#requests td.excerpt b")
            assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#requests td.grounded")] == ["—", "—"]

            Select(driver.find_element(By.ID, "rating")).select_by_value("negative")
            driver.find_element(By.ID, "apply").click()
            page_with("rating=negative", "#requests")
            rows = driver.find_elements(By.CSS_SELECTOR, "#requests a.open")
            assert len(rows) == 1
            rating = driver.find_element(By.CSS_SELECTOR, "#requests td.rating").text
            assert "-0.50" in rating and "HX-9 does not fit the 3000" in rating
            Select(driver.find_element(By.ID, "rating")).select_by_value("unrated")
            driver.find_element(By.ID, "apply").click()
            page_with("rating=unrated", "#requests")
            assert "How heavy" in driver.find_element(By.ID, "requests").text
            assert "Which filter" not in driver.find_element(By.ID, "requests").text

            driver.get(gw.url + "/review?rating=negative")
            page_with("rating=negative", "#requests a.open")
            driver.find_element(By.CSS_SELECTOR, "#requests a.open").click()
            page_with("/review/requests/", "#feedback")
            shown = driver.find_element(By.ID, "feedback").text
            assert "-0.50" in shown and "HX-9 does not fit the 3000" in shown and "wrong" in shown
            assert "key_app" in shown and "key_other" in shown

            # The picker starts on "choose…"; a label, then another, then none, each kept in the history.
            assert Select(driver.find_element(By.ID, "label")).first_selected_option.text == "choose…"
            for label, note in (("ok", "looked fine"), ("hallucination", "the filter is wrong")):
                Select(driver.find_element(By.ID, "label")).select_by_value(label)
                driver.find_element(By.ID, "note").send_keys(note)
                driver.find_element(By.ID, "save-label").click()
                wait.until(until.text_to_be_present_in_element((By.ID, "labels"), note))
            assert driver.find_element(By.ID, "current-label").text == "hallucination"
            driver.find_element(By.ID, "remove-label").click()
            wait.until(until.text_to_be_present_in_element((By.ID, "labels"), "label removed"))
            driver.get(driver.current_url)  # reload: stored, not just shown
            page_with("/review/requests/", "#labels")
            history = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#labels li")]
            assert len(history) == 3 and history[0].startswith("ok looked fine")
            assert history[1].startswith("hallucination the filter is wrong") and history[2].startswith("label removed")
            assert driver.find_element(By.ID, "current-label").text == "none"
            assert not driver.find_elements(By.ID, "remove-label")
            driver.save_screenshot(str(tmp_path / "review-feedback.png"))
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
