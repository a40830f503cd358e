"""The served web page (instruct_jax/serve/static/) end to end in headless Chromium, against the real server
with a tiny random model: a streamed multi-turn chat, then a ranking of K samples that lands in the labels
file the reward-model trainer reads.

Needs Debian's chromium + chromium-driver and selenium (INSTALL below). INSTRUCT_JAX_SCREENSHOTS=1 writes the
two screenshots into docs/ (docs/serving_chat.png, docs/serving_rank.png) instead of the test's tmp folder.
"""

import importlib.util
import json
import os
import pathlib
import shutil

import pytest
from serve_fixtures import running_server, tiny_model_dir

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver && pip install selenium==4.51.0"
API_KEY = "browser-test-key"
MODEL = "smollm2" if os.environ.get("INSTRUCT_JAX_SCREENSHOT_MODEL") else "tiny"
WAIT_S = 45  # the first request of each kind compiles the tiny model's sampler


def _browser_binaries():
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", driver),
                                        ("selenium", importlib.util.find_spec("selenium"))) if not found]
    if missing:
        message = f"the browser test needs {', '.join(missing)}: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture
def browser():
    chromium, driver_path = _browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--lang=en-US", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for failure messages
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot_dir(tmp_path):
    return REPO / "docs" if os.environ.get("INSTRUCT_JAX_SCREENSHOTS") == "1" else tmp_path


# Records the JSON body of every POST the page makes (window.__posts), to check what it sends.
RECORD_POSTS = """
window.__posts = [];
const fetch0 = window.fetch;
window.fetch = (url, init) => {
  if (init && init.method === "POST") window.__posts.push({url: String(url), body: JSON.parse(init.body)});
  return fetch0(url, init);
};
"""


def test_chat_and_rank_in_browser(browser, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = _screenshot_dir(tmp_path)
    labels = tmp_path / "labels.jsonl"
    d = browser
    wait = WebDriverWait(d, WAIT_S)

    def by_id(element_id):
        return d.find_element(By.ID, element_id)

    def page_report():
        shown = [f"#{i}: {by_id(i).text!r}" for i in ("app-error", "chat-error", "rank-error", "chat-status",
                                                       "rank-status") if by_id(i).is_displayed()]
        console = [entry["message"] for entry in d.get_log("browser")]
        return "\n".join(shown + ["console:"] + console)

    def wait_state(element_id, state):
        """Waits for #element_id[data-state=state]; fails at once, with what the page shows, on state "error"."""
        def reached(_):
            now = by_id(element_id).get_attribute("data-state")
            if now == "error":
                raise AssertionError(f"#{element_id} went to error while waiting for {state!r}:\n{page_report()}")
            return now == state
        try:
            wait.until(reached)
        except TimeoutException:
            raise AssertionError(f"#{element_id} did not reach {state!r} in {WAIT_S} s:\n{page_report()}") from None

    def fill(element_id, text):
        el = by_id(element_id)
        el.clear()
        el.send_keys(text)

    def models_state():
        return d.find_element(By.TAG_NAME, "body").get_attribute("data-models")

    # INSTRUCT_JAX_SCREENSHOT_MODEL=<model folder> serves that model instead (the docs' screenshots: SmolLM2).
    model_dir = os.environ.get("INSTRUCT_JAX_SCREENSHOT_MODEL") or tiny_model_dir(tmp_path)
    real = bool(os.environ.get("INSTRUCT_JAX_SCREENSHOT_MODEL"))  # one device: an 8-way split 135M model is slow here
    with running_server({MODEL: model_dir}, labels=labels, api_key=API_KEY, max_context=256 if real else 128,
                        devices=__import__("jax").devices()[:1] if real else None) as base_url:
        # --- the API key: asked for after the first 401, then sent on every request ---------------------------
        d.get(base_url + "/")
        wait.until(lambda _: models_state() in ("ready", "error"))
        assert models_state() == "error" and by_id("auth").is_displayed()
        assert "API key" in by_id("app-error").text
        fill("api-key", API_KEY)
        by_id("api-key-save").click()
        wait.until(lambda _: models_state() in ("ready", "error"))
        assert models_state() == "ready", page_report()
        assert not by_id("auth").is_displayed() and not by_id("app-error").is_displayed()
        assert [o.get_attribute("value") for o in Select(by_id("chat-model")).options] == [MODEL]
        d.execute_script(RECORD_POSTS)

        # --- chat: Shift+Enter is a new line, Send streams the reply; a second turn carries the first ---------
        fill("chat-system", "You are terse.")
        fill("chat-temperature", "1")
        fill("chat-max-tokens", "12")
        box = by_id("chat-input")
        box.send_keys("Hello")
        ActionChains(d).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        box.send_keys("who are you?")
        assert box.get_attribute("value") == "Hello\nwho are you?"
        assert d.find_elements(By.CSS_SELECTOR, "[data-testid=msg-user]") == []
        by_id("chat-send").click()
        wait_state("chat-status", "done")
        replies = d.find_elements(By.CSS_SELECTOR, "[data-testid=msg-assistant] .text")
        assert len(replies) == 1 and replies[0].text.strip(), "the streamed reply is empty"
        first_reply = d.execute_script("return arguments[0].textContent", replies[0])
        assert by_id("chat-input").get_attribute("value") == ""
        assert not by_id("chat-stop").is_enabled() and by_id("chat-send").is_enabled()

        box.send_keys("And then?", Keys.ENTER)  # Enter sends
        wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "[data-testid=msg-assistant]")) == 2)
        wait_state("chat-status", "done")
        chat_posts = [p["body"] for p in d.execute_script("return window.__posts")
                      if p["url"].endswith("v1/chat/completions")]
        assert len(chat_posts) == 2
        assert chat_posts[1]["messages"] == [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello\nwho are you?"},
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "And then?"},
        ]
        assert chat_posts[1]["stream"] is True and chat_posts[1]["model"] == MODEL
        assert (chat_posts[1]["temperature"], chat_posts[1]["max_tokens"]) == (1, 12)
        d.save_screenshot(str(shots / "serving_chat.png"))

        # --- rank: K samples from the tiny model, ranked with a tie, saved as one labels row -------------------
        by_id("tab-rank").click()
        assert by_id("view-rank").is_displayed() and not by_id("view-chat").is_displayed()
        fill("rank-labeler", "alice")
        prompt = "Write a haiku about sharding."
        fill("rank-prompt", prompt)
        assert by_id("rank-source-k").is_selected()
        Select(by_id("rank-model")).select_by_value(MODEL)
        fill("rank-k", "3")
        fill("rank-temperature", "1")
        fill("rank-max-tokens", "12")
        by_id("rank-sample").click()
        wait_state("rank-status", "ranking")

        cards = d.find_elements(By.CSS_SELECTOR, "[data-testid=answer-card]")
        n = len(cards)
        assert 2 <= n <= 3
        assert [c.find_element(By.TAG_NAME, "h3").text for c in cards] == [f"Answer {x}" for x in "ABC"[:n]]
        texts = [d.execute_script("return arguments[0].textContent",
                                  c.find_element(By.CSS_SELECTOR, "[data-testid=answer-text]")) for c in cards]
        selects = [Select(c.find_element(By.CSS_SELECTOR, "[data-testid=rank-select]")) for c in cards]

        # Checked before anything is sent: every answer ranked, and not all tied.
        by_id("rank-submit").click()
        assert "Rank every answer" in by_id("rank-error").text
        for s in selects:
            s.select_by_value("1")
        by_id("rank-submit").click()
        assert "tied" in by_id("rank-error").text
        chosen = [n - i for i in range(n)]  # the last answer is the best ...
        if n >= 3:
            chosen[0] = chosen[1]  # ... and the first two tie
        for s, r in zip(selects, chosen):
            s.select_by_value(str(r))
        d.save_screenshot(str(shots / "serving_rank.png"))
        by_id("rank-submit").click()
        wait_state("rank-status", "saved")

        # The form is ready for the next prompt; the labeler's name stays.
        assert by_id("rank-prompt").get_attribute("value") == ""
        assert not by_id("rank-answers-box").is_displayed()
        assert by_id("rank-sample").is_enabled()
        assert not by_id("rank-error").is_displayed()
        assert by_id("rank-status").get_attribute("data-row") not in (None, "")
        rank_posts = [p["body"] for p in d.execute_script("return window.__posts") if p["url"].endswith("v1/rankings")]
        assert len(rank_posts) == 1  # the two invalid tries never reached the server

        d.refresh()  # the key and the labeler's name are remembered (localStorage)
        wait.until(lambda _: models_state() in ("ready", "error"))
        assert models_state() == "ready" and not by_id("auth").is_displayed(), page_report()
        by_id("tab-rank").click()
        assert by_id("rank-labeler").get_attribute("value") == "alice"

    rows = [json.loads(line) for line in labels.read_text().splitlines() if line.strip()]
    assert len(rows) == 1
    row = rows[0]
    assert row["prompt"] == [{"role": "user", "content": prompt}]
    assert row["labeler"] == "alice"
    assert sorted(row["responses"]) == sorted(texts)
    assert dict(zip(row["responses"], row["ranks"])) == dict(zip(texts, chosen))
    assert row["models"] == [[MODEL]] * n  # per response, every model that wrote it (identical answers merged)
