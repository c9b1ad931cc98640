"""A citation's link opened in a real headless Chromium (issue 17): the document view shows the
document with the cited passage highlighted (the link's `#chunk-ID` is the page's `:target`),
for a signed-in reviewer whose key may read the collection; others are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.fake import FakeBackendThread
from tests.browser import chromium, needs_chromium, sign_in
from tests.gateway.test_citations_api import ANSWER, QUESTION, make_key, rag_settings
from tests.helpers import GatewayServer

pytestmark = [pytest.mark.slow, needs_chromium]
HIGHLIGHT = "rgba(255, 243, 160, 1)"  # .chunk:target in templates/documents/view.html


def test_cited_passage_is_highlighted_and_other_keys_are_refused(
    tmp_path: Path, fake_backend: FakeBackendThread
) -> None:
    import openai
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    settings = rag_settings(tmp_path, fake_backend.url)
    reader = make_key(settings, "reviewer", collections=frozenset({"products"}))
    outsider = make_key(settings, "reviewer", collections=frozenset({"internal"}))
    with GatewayServer(settings) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=reader, max_retries=0)
        reply = client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"rag": {"collection": "products", "top_k": 2, "min_score": 0.05}, "fake": {"answer": ANSWER}},
        )
        citation = reply.model_extra["gateway"]["citations"][0]
        link = next(
            a.url_citation.url
            for a in reply.choices[0].message.annotations or []
            if a.url_citation.title == citation["title"]
        )
        client.close()
        driver = chromium()
        try:
            wait = WebDriverWait(driver, 20)
            sign_in(driver, gw.url, reader)
            driver.get(gw.url + link)
            wait.until(until.presence_of_element_located((By.CSS_SELECTOR, "section.chunk")))
            cited = driver.find_element(By.CSS_SELECTOR, ".chunk:target")
            assert cited.get_attribute("data-chunk") == citation["chunk_id"]
            assert "4.2 kg" in cited.text
            assert cited.value_of_css_property("background-color") == HIGHLIGHT
            assert driver.title.startswith(citation["title"])

            sign_in(driver, gw.url, outsider)
            driver.get(gw.url + link)
            body = driver.find_element(By.TAG_NAME, "body").text
            assert '"code":"permission_denied"' in body.replace(" ", "") or "may not read" in body
            assert not driver.find_elements(By.CSS_SELECTOR, "section.chunk")
        finally:
            driver.quit()
