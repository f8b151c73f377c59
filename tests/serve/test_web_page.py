"""The web chat page in headless Chromium: a streamed greedy reply equal to the API's, its speed, stop.

Chromium and its driver are Debian's `chromium` and `chromium-driver` (`make test` installs them with
apt-get). A missing one fails the test with the command that installs it, never skips it: a skipped page
test would let a broken page through CI unnoticed.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from serving import MODEL_NAME, post_json, start_server

from fucina.model.config import ModelConfig
from fucina.model.io import save_model
from fucina.model.transformer import Transformer
from fucina.tokenizer import FucinaTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
# The screenshot docs/serve.md shows; written when absent (delete it to refresh it).
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "images" / "web-chat.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,800",
)
QUESTION = "Qual è la capitale d'Italia?"
FOLLOW_UP = "E quella della Francia?"
REPLY_TOKENS = 128
# The endless model needs seconds for this many tokens; the stop button must end the reply long before.
LONG_REPLY_TOKENS = 4000
ENDLESS_CONTEXT = 4096

# Records the length of the reply's text at each change, to see that it grew piece by piece.
WATCH_REPLY_GROWTH = """
window.replyLengths = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('.message.assistant .content');
  if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
}).observe(document.getElementById('conversation'), {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, driven by Debian's chromedriver."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: run `make test` (it installs them) or, as root, "
            "`apt-get install chromium chromium-driver`"
        )
    options = Options()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def endless_server_url(served_model_dir, tmp_path_factory) -> Iterator[str]:
    """A server of an untrained model whose greedy reply never reaches an end-of-turn token."""
    directory = tmp_path_factory.mktemp("endless") / "endless-it"
    tokenizer = FucinaTokenizer.load(served_model_dir)
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        context_length=ENDLESS_CONTEXT,
        n_layers=2,
        d_model=64,
        n_heads=4,
        d_ff=128,
    )
    model = Transformer(config).eval()
    with torch.no_grad():  # logit 0 for the end-of-turn tokens: never the greedy pick of 400 random logits
        model.lm_head.weight[tokenizer.template.stop_token_ids(tokenizer)] = 0.0
    save_model(model, directory)
    tokenizer.save(directory)
    with start_server(directory, max_batch=4) as url:
        yield url


def open_chat(driver: WebDriver, url: str, model_name: str) -> None:
    """Load the page and wait until it has asked the server for its model's name."""
    driver.get(url + "/")
    WebDriverWait(driver, 10).until(lambda d: model_name in d.find_element(By.ID, "model-name").text)


def fill(driver: WebDriver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def ask(driver: WebDriver, question: str, temperature: str, max_tokens: int) -> WebElement:
    """Set the sampling fields, send the question; the reply's element, as soon as the page adds it."""
    fill(driver, "temperature", temperature)
    fill(driver, "max-tokens", str(max_tokens))
    fill(driver, "prompt", question)
    driver.find_element(By.ID, "send").click()
    return WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant"))[
        -1
    ]


def reply_text(reply: WebElement) -> str:
    """The reply exactly as shown: textContent keeps every space and newline the model wrote."""
    return reply.find_element(By.CLASS_NAME, "content").get_attribute("textContent")


def wait_until_finished(reply: WebElement, timeout: float = 30) -> str:
    WebDriverWait(reply.parent, timeout, poll_frequency=0.02).until(
        lambda _: reply.get_attribute("data-state") != "streaming"
    )
    return reply.get_attribute("data-state")


def server_load(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.loads(response.read())


def test_streamed_greedy_reply_equals_the_api_answer_and_shows_tokens_per_second(
    browser, server_url, tmp_path
):
    open_chat(browser, server_url, MODEL_NAME)
    browser.execute_script(WATCH_REPLY_GROWTH)
    reply = ask(browser, QUESTION, "0", REPLY_TOKENS)
    assert wait_until_finished(reply) == "done"

    status, expected = post_json(
        server_url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": REPLY_TOKENS},
    )
    assert status == 200
    answer = expected["choices"][0]["message"]["content"]
    assert answer, "the greedy answer must hold text for the comparison to mean anything"
    assert reply_text(reply) == answer
    assert reply.get_attribute("data-finish-reason") == expected["choices"][0]["finish_reason"]
    lengths = browser.execute_script("return window.replyLengths;")
    assert len({n for n in lengths if 0 < n < len(answer)}) >= 2, (
        f"the reply did not grow piece by piece: {lengths}"
    )

    stats = reply.find_element(By.CLASS_NAME, "stats")
    assert float(stats.get_attribute("data-tokens-per-second")) > 0
    assert f"{expected['usage']['completion_tokens']} token" in stats.text and "token/s" in stats.text
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()

    screenshot = tmp_path / "web-chat.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    if not DOCS_SCREENSHOT.exists():
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)

    # The next question goes with the conversation so far, as the API would receive it.
    follow_up = ask(browser, FOLLOW_UP, "0", REPLY_TOKENS)
    assert wait_until_finished(follow_up) == "done"
    conversation = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": FOLLOW_UP},
    ]
    status, expected = post_json(
        server_url + "/v1/chat/completions",
        {"messages": conversation, "temperature": 0, "max_tokens": REPLY_TOKENS},
    )
    assert status == 200 and reply_text(follow_up) == expected["choices"][0]["message"]["content"]


def test_stop_button_ends_a_long_reply_and_frees_the_servers_row(browser, endless_server_url):
    open_chat(browser, endless_server_url, "endless-it")
    reply = ask(browser, "Raccontami una lunga storia.", "0", LONG_REPLY_TOKENS)
    WebDriverWait(browser, 10, poll_frequency=0.02).until(lambda _: reply_text(reply))
    # The row is busy while the reply streams (polled: on a loaded machine the first look may land
    # between the scheduler's bookkeeping steps).
    WebDriverWait(browser, 2, poll_frequency=0.02).until(
        lambda _: server_load(endless_server_url)["running"] == 1
    )
    browser.find_element(By.ID, "stop").click()

    assert wait_until_finished(reply, timeout=5) == "stopped"
    assert "interrotta" in reply.find_element(By.CLASS_NAME, "stats").text
    shown = reply_text(reply)
    deadline = time.monotonic() + 2
    while (load := server_load(endless_server_url))["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert load["running"] == 0 and load["waiting"] == 0
    assert load["generated_tokens"] < LONG_REPLY_TOKENS, (
        "the server generated the whole reply: stop came too late"
    )
    assert reply_text(reply) == shown
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()


def test_api_key_typed_once_authorises_the_page_for_the_whole_tab(browser, served_model_dir):
    with start_server(served_model_dir, api_key="chiave-segreta") as url:
        browser.get(url + "/")
        model_name = browser.find_element(By.ID, "model-name")
        WebDriverWait(browser, 10).until(lambda _: "chiave API" in model_name.text)
        fill(browser, "api-key", "chiave-segreta")
        browser.find_element(By.ID, "temperature").click()  # leaving the field commits the key
        WebDriverWait(browser, 10).until(lambda _: MODEL_NAME in model_name.text)

        browser.refresh()  # the key outlives a reload: it is in sessionStorage
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == "chiave-segreta"
        open_chat(browser, url, MODEL_NAME)
        reply = ask(browser, QUESTION, "0", REPLY_TOKENS)
        assert wait_until_finished(reply) == "done" and reply_text(reply)
        browser.execute_script("sessionStorage.clear();")
