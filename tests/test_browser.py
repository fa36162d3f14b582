"""The browser face in a real browser: Debian's chromium, headless, with every non-loopback request blocked.

Screenshots go to test-artifacts/. Install the browser with `make browser` (CI does).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.server import Server, running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
KEY = "sk-browser"

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (make browser)"),
]

# The flags this workplace's closed network needs; --no-sandbox because CI runs as root.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tiny_loras: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    env = {"MODEL_ID": str(tiny_model_dir), "API_KEY": KEY, "WARMUP": "false"}
    env["LORA_ADAPTERS"] = f"ink={tiny_loras['ink']}"
    with running_server(env, tmp_path_factory.mktemp("browser")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield launched
        launched.close()


class OfflinePage:
    """A page whose requests to anything but loopback are aborted and recorded."""

    def __init__(self, browser, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.blocked: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))

    def _route(self, route) -> None:
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("blob:", "data:")):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def offline(browser) -> Iterator[OfflinePage]:
    page = OfflinePage(browser)
    yield page
    page.close()


def test_swagger_ui_renders_offline_with_every_operation(server: Server, offline: OfflinePage) -> None:
    page = offline.page
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".opblock", timeout=20_000)
    text = page.inner_text("body")
    for path in ("/v1/images/generations", "/v1/models", "/v1/images/files/{name}", "/health"):
        assert path in text
    assert page.locator("button.authorize").count() == 1, "the Bearer scheme makes 'Authorize' appear"
    page.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=False)
    assert offline.blocked == [], offline.blocked


def test_swagger_try_it_out_works_with_the_key(server: Server, offline: OfflinePage) -> None:
    page = offline.page
    page.goto(f"{server.url}/docs")
    page.click("button.authorize")
    page.fill(".auth-container input", KEY)
    page.click(".auth-btn-wrapper button.authorize")
    page.click(".btn-done") if page.locator(".btn-done").count() else page.keyboard.press("Escape")
    page.click("#operations-models-list_models_v1_models_get .opblock-summary")
    page.click("#operations-models-list_models_v1_models_get button.try-out__btn")
    page.click("#operations-models-list_models_v1_models_get button.execute")
    page.wait_for_selector(
        "#operations-models-list_models_v1_models_get .response .response-col_status", timeout=20_000
    )
    body = page.inner_text("#operations-models-list_models_v1_models_get .responses-wrapper")
    assert "tiny-sd3" in body and "200" in body


def test_redoc_renders_offline(server: Server, offline: OfflinePage) -> None:
    page = offline.page
    page.goto(f"{server.url}/redoc")
    page.wait_for_function("document.body.innerText.includes('Create images from a prompt')", timeout=30_000)
    text = page.inner_text("body")
    assert "/v1/images/generations" in text and "List Models" in text
    assert "bearerAuth" in text, "the security scheme is documented"
    assert "ErrorResponse" in page.content() or "invalid_request_error" in text or "error" in text
    page.screenshot(path=str(ARTIFACTS / "redoc.png"))
    # ReDoc's sidebar badge always asks for Redocly's logo and drops the image
    # when that fails (its onError handler); nothing else may leave the machine.
    assert set(offline.blocked) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, offline.blocked


def _generate(page, prompt: str, key: str, n: str = "2", seed: str = "7") -> None:
    page.fill("#prompt", prompt)
    page.select_option("#size", "512x512")
    page.select_option("#n", n)
    page.fill("#seed", seed)
    page.fill("#key", key)
    page.click("#go")


def test_playground_generates_and_shows_images(server: Server, offline: OfflinePage) -> None:
    page = offline.page
    page.goto(f"{server.url}/")
    _generate(page, "a lighthouse at dawn", KEY)
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 2", timeout=60_000)
    page.wait_for_function(
        "[...document.querySelectorAll('#gallery img')].every(img => img.complete && img.naturalWidth === 512)"
    )
    links = page.locator("#gallery figcaption a")
    assert sorted(links.nth(i).get_attribute("download") for i in range(2)) == ["sd35-7.png", "sd35-8.png"]
    assert links.first.get_attribute("href").startswith("blob:")
    assert page.inner_text("#status").startswith("Done in")
    page.screenshot(path=str(ARTIFACTS / "playground.png"))
    assert offline.blocked == [] and offline.console_errors == [], (offline.blocked, offline.console_errors)


def test_playground_model_selector_lists_and_uses_the_adapters(server: Server, offline: OfflinePage) -> None:
    page = offline.page
    page.goto(f"{server.url}/")
    assert page.locator("#model option").all_inner_texts() == ["Base model"], "/v1/models needs the key"
    page.fill("#key", KEY)
    page.focus("#model")
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    assert page.locator("#model option").all_inner_texts() == ["tiny-sd3 (base model)", "ink (LoRA on tiny-sd3)"]
    page.select_option("#model", "ink")
    page.fill("#prompt", "a lighthouse")
    page.select_option("#size", "512x512")
    page.fill("#seed", "7")
    with page.expect_response("**/v1/images/generations") as answer:
        page.click("#go")
    assert answer.value.request.post_data_json["model"] == "ink"
    shown = answer.value.json()["data"][0]["b64_json"]
    body = {"prompt": "a lighthouse", "size": "512x512", "seed": 7, "n": 1, "response_format": "b64_json"}
    headers = {"Authorization": f"Bearer {KEY}"}
    direct = {
        model: httpx.post(
            f"{server.url}/v1/images/generations", json={**body, "model": model}, headers=headers, timeout=60
        )
        for model in ("ink", "tiny-sd3")
    }
    assert shown == direct["ink"].json()["data"][0]["b64_json"] != direct["tiny-sd3"].json()["data"][0]["b64_json"]
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 1", timeout=60_000)
    assert offline.blocked == [] and offline.console_errors == [], (offline.blocked, offline.console_errors)


def test_playground_shows_a_wrong_key_readably(server: Server, offline: OfflinePage) -> None:
    page = offline.page
    page.goto(f"{server.url}/")
    _generate(page, "a lighthouse", "not-the-key", n="1")
    page.wait_for_function("document.querySelector('#status').classList.contains('error')", timeout=30_000)
    assert page.inner_text("#status") == "Authentication failed: Invalid API key Enter the server's API key."
    assert page.evaluate("document.activeElement.id") == "key", "focus goes to the key field"
    assert page.locator("#gallery img").count() == 0


def test_playground_shows_validation_errors(server: Server, offline: OfflinePage) -> None:
    page = offline.page
    page.goto(f"{server.url}/")
    _generate(page, "x" * 10, KEY, n="1", seed="")
    page.fill("#prompt", "a")
    page.evaluate("document.querySelector('#size').add(new Option('1000x1000', '1000x1000', true, true))")
    page.click("#go")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Invalid request')")
    assert "not a multiple of 16" in page.inner_text("#status")


def test_playground_works_with_the_keyboard_alone(server: Server, offline: OfflinePage) -> None:
    page = offline.page
    page.goto(f"{server.url}/")
    page.keyboard.press("Tab")  # docs link
    page.keyboard.press("Tab")  # redoc link
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.type("a kite over the sea")
    for _ in range(6):  # model, size, n, seed, format, key
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "key"
    page.keyboard.type(KEY)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "go"
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 1", timeout=60_000)
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Control+Enter")  # from the key field nothing happens; from the prompt it submits
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 2", timeout=60_000)


def test_playground_fits_a_narrow_screen(server: Server, browser) -> None:
    narrow = OfflinePage(browser, width=375, height=800)
    try:
        page = narrow.page
        page.goto(f"{server.url}/")
        _generate(page, "a small boat", KEY, n="1")
        page.wait_for_function("document.querySelectorAll('#gallery img').length === 1", timeout=60_000)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375, "no sideways scrolling"
        form_box, results_box = page.locator("#form").bounding_box(), page.locator("#results").bounding_box()
        assert results_box["y"] >= form_box["y"] + form_box["height"], "one column: results below the form"
        page.screenshot(path=str(ARTIFACTS / "playground-narrow.png"), full_page=True)
    finally:
        narrow.close()


def test_playground_explains_a_model_that_is_not_ready(browser, tmp_path: Path) -> None:
    with running_server({"MODEL_ID": "/nonexistent/model", "WARMUP": "false"}, tmp_path, ready=False) as broken:
        page = OfflinePage(browser)
        try:
            page.page.goto(f"{broken.url}/")
            page.page.wait_for_selector("#banner.show", timeout=20_000)
            # "loading" first; the page polls /health and shows the failure once it is known.
            page.page.wait_for_function(
                "document.querySelector('#banner').textContent.includes('failed to load')", timeout=30_000
            )
            assert "Model not ready: the model failed to load" in page.page.inner_text("#banner")
            _generate(page.page, "a cat", "", n="1")
            page.page.wait_for_function("document.querySelector('#status').textContent.startsWith('Not ready')")
            assert "no such directory exists" in page.page.inner_text("#status")
        finally:
            page.close()
