"""The web console in a real browser (Debian's Chromium, driven by Playwright) on a real mesh.

The mesh has keys on (the console sends the pasted key as a bearer token), the admin API on
its own origin (the only place the keys page appears) and, beside the embedded model, an
upstream model that says back what it is told, for answers whose text the test chooses.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Dialog, FilePayload, Page, expect, sync_playwright

from ..echo_upstream import ECHO_MODEL, EchoUpstream
from .conftest import MODEL, Mesh, mesh_env, running_mesh
from .test_resilience import active_requests
from .test_retrieval_api import DOCS, wait_job

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("RAGMESH_CHROMIUM", "/usr/bin/chromium")
ADMIN_KEY = "admin-" + "c0ns0le" * 4
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoUpstream]:
    with EchoUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, echo: EchoUpstream) -> Iterator[Mesh]:
    run_dir = tmp_path_factory.mktemp("console")
    backends = run_dir / "backends.yaml"
    backends.write_text("backends:\n  - {name: embedded, type: embedded}\n" + echo.backend_entry())
    env = mesh_env(
        run_dir,
        RAGMESH_PREPROCESS_AUTH="on",
        RAGMESH_PREPROCESS_ADMIN_KEY=ADMIN_KEY,
        RAGMESH_INFERENCE_BACKENDS_FILE=str(backends),
        RAGMESH_INFERENCE_N_THREADS="1",
        RAGMESH_INFERENCE_N_THREADS_BATCH="1",
        RAGMESH_PREPROCESS_BATCH_BACKOFF_BASE="0.5",
    )
    with running_mesh(run_dir, env) as started:
        yield started


@pytest.fixture(scope="module")
def api_key(mesh: Mesh) -> str:
    """A key made through the admin API, as an operator would hand it out."""
    reply = httpx.post(
        f"{mesh.admin}/v1/admin/keys", json={"name": "console-tests"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert reply.status_code == 201, reply.text
    return str(reply.json()["key"])


@pytest.fixture(scope="module")
def api(mesh: Mesh, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.gateway, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def browser(mesh: Mesh) -> Iterator[Browser]:
    # After the mesh, so closed before it: while Playwright runs, its loop is this thread's
    # running loop, and the mesh's teardown (asyncio.run) could not run.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium package"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


class Watched:
    """A page, and what it did that a test must see did not happen: dialogs, script errors."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", self._console)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(message.text)


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    seen = Watched(page)
    yield seen
    context.close()
    assert seen.errors == [], seen.errors


def open_console(page: Page, origin: str, key: str | None, fragment: str = "chat") -> None:
    page.goto(f"{origin}/#{fragment}")
    page.wait_for_selector("body[data-ready]")
    if key is not None:
        page.fill("#api-key", key)
        page.click("#apikey-form button[type=submit]")
        page.wait_for_selector(f'#chat-model option[value="{MODEL}"]', state="attached")


def last_answer(page: Page) -> Any:
    return page.locator("#messages li.assistant").last


def ask(page: Page, text: str, *, model: str = MODEL, max_tokens: int = 24, collection: str = "") -> None:
    page.select_option("#chat-model", model)
    page.select_option("#chat-collection", collection)
    page.fill("#chat-max-tokens", str(max_tokens))
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", text)
    page.focus("#chat-input")
    page.keyboard.press("Enter")  # Enter sends (Shift+Enter would add a line)


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(map(json.dumps, rows)).encode()


def finished(page: Page) -> None:
    expect(last_answer(page)).not_to_have_attribute("aria-busy", "true", timeout=60_000)


# --- served by nginx --------------------------------------------------------------------------


def test_browsers_get_the_console_and_api_clients_the_index(mesh: Mesh) -> None:
    html = httpx.get(f"{mesh.gateway}/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    csp = html.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert "<script" in html.text and not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html.text), "inline script"
    index = httpx.get(f"{mesh.gateway}/")
    assert index.headers["content-type"].startswith("application/json") and index.json()["object"] == "index"
    module = httpx.get(f"{mesh.gateway}/console/js/app.js")
    assert module.headers["content-type"].startswith("text/javascript") and "content-security-policy" in module.headers
    assert httpx.get(f"{mesh.admin}/", headers={"Accept": "text/html"}).headers["content-type"].startswith("text/html")


# --- chat -------------------------------------------------------------------------------------


def test_without_a_key_the_error_shows_its_message_and_request_id(watched: Watched, mesh: Mesh) -> None:
    page = watched.page
    open_console(page, mesh.gateway, None)
    alert = page.locator("#chat-catalog-error [role=alert]")
    expect(alert).to_contain_text("HTTP 401")
    expect(alert.locator(".request-id code")).to_have_text(re.compile(r"\S{8,}"))


def test_chat_answer_streams_in_and_grows(watched: Watched, mesh: Mesh, api_key: str) -> None:
    page = watched.page
    open_console(page, mesh.gateway, api_key)
    # Every length the answer had on the page, as the browser rendered it.
    page.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => { const a = document.querySelectorAll('#messages li.assistant .content');
          if (a.length) window.lengths.push(a[a.length - 1].textContent.length); })
        .observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true}); }"""
    )
    ask(page, "Tell me a short story about a cat and a boat.", max_tokens=64)
    finished(page)
    lengths = page.evaluate("window.lengths")
    growing = [n for n in lengths if n > 0]
    assert len(set(growing)) >= 3, lengths  # shown piece by piece, not all at once
    assert growing == sorted(growing)
    text = last_answer(page).locator(".content").text_content()
    assert text and len(text) == growing[-1]
    expect(last_answer(page).locator(".usage")).to_contain_text("completion tokens")
    # The conversation stays on the page, and the next question carries it.
    ask(page, "And backwards?", max_tokens=8)
    finished(page)
    expect(page.locator("#messages li.user")).to_have_count(2)


def choices_stopped(mesh: Mesh) -> float:
    text = httpx.get(mesh.inference_metrics, timeout=5).text
    match = re.search(r"^ragmesh_inference_choices_stopped_total (\S+)$", text, re.M)
    assert match, "inference exports ragmesh_inference_choices_stopped_total"
    return float(match.group(1))


def test_stop_cancels_the_generation_and_frees_the_engine(watched: Watched, mesh: Mesh, api_key: str) -> None:
    page = watched.page
    open_console(page, mesh.gateway, api_key)
    ask(page, "Write a very long essay about the history of the sea.", max_tokens=1500)
    expect(last_answer(page).locator(".content")).not_to_have_text("", timeout=60_000)
    assert active_requests(mesh) == 1
    stopped = choices_stopped(mesh)
    page.click("#chat-stop")
    # The browser closes the stream; nginx drops the upstream, preprocess cancels the calls, and
    # the engine's thread leaves its slot at its next token: the stop counter proves the choice
    # ended by the stop (a 1,500-token essay running to its end would not count). The deadline
    # only keeps a broken cancel from hanging the test.
    deadline = time.monotonic() + 60
    while (active_requests(mesh) != 0 or choices_stopped(mesh) == stopped) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert active_requests(mesh) == 0 and choices_stopped(mesh) == stopped + 1, "Stop did not stop the engine"
    expect(last_answer(page)).to_contain_text("Stopped.")
    expect(page.locator("#chat-send")).to_be_enabled()
    expect(page.locator("#chat-stop")).to_be_disabled()


def test_model_output_with_markup_is_shown_as_text(watched: Watched, mesh: Mesh, api_key: str) -> None:
    page = watched.page
    open_console(page, mesh.gateway, api_key)
    ask(page, XSS, model=ECHO_MODEL)
    finished(page)
    expect(last_answer(page).locator(".content")).to_have_text(XSS)
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("document.images.length") == 0
    assert watched.dialogs == []


# --- RAG --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facts(api: httpx.Client) -> str:
    api.post("/v1/collections", json={"name": "console-facts"})
    accepted = api.post("/v1/collections/console-facts/documents", json={"documents": DOCS}).json()
    job, _ = wait_job(api, accepted["job_id"])
    assert job["status"] == "succeeded"
    api.post("/v1/collections", json={"name": "console-empty"})
    return "console-facts"


def test_rag_answer_has_citations_that_open_their_passages(
    watched: Watched, mesh: Mesh, api_key: str, facts: str
) -> None:
    page = watched.page
    open_console(page, mesh.gateway, api_key)
    page.wait_for_selector(f'#chat-collection option[value="{facts}"]', state="attached")
    page.fill("#chat-topk", "2")
    ask(page, "What causes ocean tides?", max_tokens=16, collection=facts)
    finished(page)
    answer = last_answer(page)
    expect(answer.locator(".rag-status")).to_have_attribute("data-status", "ok")
    citations = answer.locator("button.citation")
    expect(citations).to_have_count(2)
    expect(citations.first).to_contain_text("[1]")
    citations.first.focus()
    page.keyboard.press("Enter")  # opened from the keyboard
    dialog = page.locator("#passage")
    expect(dialog).to_be_visible()
    expect(page.locator("#passage-doc")).to_have_text("tides")
    expect(page.locator("#passage-chunk")).to_have_text("tides#0")
    expect(page.locator("#passage-title")).to_contain_text("Tides")
    expect(page.locator("#passage-text")).to_contain_text("moon")
    expect(page.locator("#passage-score")).to_have_text(re.compile(r"^\d\.\d{3}"))
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    # An empty collection: the problem said plainly, no citations.
    ask(page, "What causes ocean tides?", max_tokens=16, collection="console-empty")
    finished(page)
    status = last_answer(page).locator(".rag-status")
    expect(status).to_have_attribute("data-status", "no_sources")
    expect(status).to_contain_text("No sources were found")
    expect(last_answer(page).locator("button.citation")).to_have_count(0)


# --- collections ------------------------------------------------------------------------------


def test_create_drop_a_file_watch_the_job_and_search(watched: Watched, mesh: Mesh, api_key: str) -> None:
    page = watched.page
    open_console(page, mesh.gateway, api_key, "collections")
    page.fill("#collection-name", "console-upload")
    page.click("#collection-create button[type=submit]")
    expect(page.locator("#collection-create-out")).to_contain_text("created")
    expect(page.locator("#upload-collection")).to_have_value("console-upload")
    # A Markdown file dropped on the drop zone (its text carries markup, shown as text later).
    markdown = "# Volcanoes\n\nVolcanoes erupt when magma rises. " + XSS
    transfer = page.evaluate_handle(
        """(text) => { const t = new DataTransfer();
        t.items.add(new File([text], 'volcanoes.md', {type: 'text/markdown'})); return t; }""",
        markdown,
    )
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    lines = [{"id": "glaciers", "title": "Glaciers", "text": "Glaciers are rivers of ice that carve valleys."}]
    more = FilePayload(name="more.jsonl", mimeType="text/plain", buffer=jsonl(lines))
    page.set_input_files("#upload-files", files=more)
    for name in ("volcanoes.md", "more.jsonl"):
        status = page.locator(f'#jobs li[data-file="{name}"] .job-status')
        expect(status).to_have_attribute("data-status", "succeeded", timeout=60_000)
    expect(page.locator('#collections-table tr[data-name="console-upload"] td').first).to_have_text("2")

    page.select_option("#search-collection", "console-upload")
    page.fill("#search-query", "why do volcanoes erupt")
    page.select_option("#search-mode", "sparse")
    page.click("#search-form button[type=submit]")
    expect(page.locator("#search-summary")).to_contain_text("mode sparse")
    first = page.locator("#search-results li.result").first
    expect(first).to_contain_text("volcanoes.md")
    expect(first.locator(".score")).to_have_text(re.compile(r"score \d"))
    expect(first.locator(".passage-text")).to_contain_text(XSS)
    assert page.evaluate("document.images.length") == 0 and watched.dialogs == []


# --- batches ----------------------------------------------------------------------------------


def batch_file(n: int, model: str, max_tokens: int) -> FilePayload:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"Say {i}"}]},
        }
        for i in range(n)
    ]
    return {
        "name": "lines.jsonl",
        "mimeType": "application/jsonl",
        "buffer": "\n".join(map(json.dumps, lines)).encode(),
    }


def test_batch_runs_to_completion_and_its_results_download(watched: Watched, mesh: Mesh, api_key: str) -> None:
    page = watched.page
    open_console(page, mesh.gateway, api_key, "batches")
    page.set_input_files("#batch-file", files=batch_file(3, ECHO_MODEL, 8))
    page.click("#batch-form button[type=submit]")
    expect(page.locator("#batch-form-out")).to_contain_text("started")
    batch = page.locator("#batches li.batch").first
    expect(batch).to_have_attribute("data-status", "completed", timeout=60_000)
    expect(batch.locator(".counts")).to_have_text("3 completed, 0 failed of 3")
    with page.expect_download() as download:
        batch.get_by_role("button", name="Download results").click()
    results = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["line-0", "line-1", "line-2"]
    assert results[0]["response"]["body"]["choices"][0]["message"]["content"].startswith("Say ")


def test_batch_can_be_cancelled(watched: Watched, mesh: Mesh, api_key: str) -> None:
    page = watched.page
    open_console(page, mesh.gateway, api_key, "batches")
    page.set_input_files("#batch-file", files=batch_file(4, MODEL, 1500))
    page.click("#batch-form button[type=submit]")
    expect(page.locator("#batch-form-out")).to_contain_text("started")
    batch = page.locator("#batches li.batch").first
    batch.get_by_role("button", name="Cancel").click()
    expect(batch).to_have_attribute("data-status", "cancelled", timeout=60_000)
    expect(batch.get_by_role("button", name="Download errors")).to_be_visible()


# --- keys: the admin origin only -------------------------------------------------------------


def test_keys_page_is_offered_on_the_admin_origin_only(watched: Watched, mesh: Mesh, api_key: str) -> None:
    page = watched.page
    open_console(page, mesh.gateway, api_key, "keys")
    expect(page.locator("#nav-keys")).to_be_hidden()
    expect(page.locator("#page-keys")).to_be_hidden()
    expect(page.locator("#page-chat")).to_be_visible()

    open_console(page, mesh.admin, api_key, "keys")
    expect(page.locator("#nav-keys")).to_be_visible()
    expect(page.locator("#page-keys")).to_be_visible()
    expect(page.locator("#keys-out [role=alert]")).to_contain_text("HTTP 401")  # no admin key yet
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#admin-key-form button[type=submit]")
    page.fill("#key-name", "made-in-the-console")
    page.fill("#key-rpm", "30")
    page.click("#key-create button[type=submit]")
    secret = page.locator("#key-created code.secret").text_content()
    assert secret and secret.startswith("rm-")
    made = httpx.get(f"{mesh.v1}/models", headers={"Authorization": f"Bearer {secret}"})
    assert made.status_code == 200
    row = page.locator("#keys-table tr", has_text="made-in-the-console")
    expect(row).to_contain_text("30 req/min")
    row.get_by_role("button", name="Revoke key made-in-the-console").click()
    expect(row).to_contain_text("revoked")
    assert httpx.get(f"{mesh.v1}/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    # The chat works on the admin origin too (the public API behind it, with the same keys).
    open_console(page, mesh.admin, api_key, "chat")
    ask(page, "hello from the admin origin", model=ECHO_MODEL)
    finished(page)
    expect(last_answer(page).locator(".content")).to_have_text("hello from the admin origin")


# --- accessibility ----------------------------------------------------------------------------


def test_every_control_is_labelled_and_reachable_by_keyboard(watched: Watched, mesh: Mesh, api_key: str) -> None:
    page = watched.page
    open_console(page, mesh.gateway, api_key)
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.outerHTML)"""
    )
    assert unlabelled == []
    # From the top of a fresh page: the skip link first, then the pages, focus always visible.
    page.reload()
    page.wait_for_selector("body[data-ready]")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    for name in ("chat", "collections"):
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.dataset.page") == name
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline not in ("none", ""), outline
    page.keyboard.press("Enter")
    expect(page.locator("#page-collections")).to_be_visible()


@pytest.mark.parametrize("fragment", ["chat", "collections", "batches"])
def test_usable_at_phone_width(watched: Watched, mesh: Mesh, api_key: str, fragment: str) -> None:
    page = watched.page
    page.set_viewport_size({"width": 390, "height": 844})
    open_console(page, mesh.gateway, api_key, fragment)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "scrolls sideways"
    for control in page.locator(f"#page-{fragment} button:visible, #page-{fragment} input:visible").all():
        box = control.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, control.evaluate("e => e.id || e.outerHTML")


# --- screenshots (README) ---------------------------------------------------------------------


def test_screenshots_of_chat_with_citations_and_collections(
    watched: Watched, mesh: Mesh, api_key: str, facts: str, tmp_path: Path
) -> None:
    """Desktop and phone width. RAGMESH_CONSOLE_SCREENSHOTS=docs makes the README's pictures."""
    out = Path(os.environ.get("RAGMESH_CONSOLE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page = watched.page
    for name, width, height in (("desktop", 1280, 860), ("phone", 390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        open_console(page, mesh.gateway, api_key)
        page.wait_for_selector(f'#chat-collection option[value="{facts}"]', state="attached")
        page.fill("#chat-system", "Answer in one sentence.")
        page.fill("#chat-topk", "2")
        ask(page, "What causes ocean tides?", max_tokens=40, collection=facts)
        finished(page)
        expect(last_answer(page).locator("button.citation")).to_have_count(2)
        page.screenshot(path=str(out / f"console-chat-{name}.png"), full_page=True)
        last_answer(page).locator("button.citation").first.click()
        expect(page.locator("#passage")).to_be_visible()
        page.screenshot(path=str(out / f"console-citation-{name}.png"))
        page.keyboard.press("Escape")

        page.goto(f"{mesh.gateway}/#collections")
        page.wait_for_selector(f'#search-collection option[value="{facts}"]', state="attached")
        page.select_option("#upload-collection", facts)
        note = f"Spring tides are the highest tides; they follow the new and the full moon ({name})."
        page.set_input_files(
            "#upload-files", files=FilePayload(name=f"spring-{name}.md", mimeType="text/markdown", buffer=note.encode())
        )
        status = page.locator(f'#jobs li[data-file="spring-{name}.md"] .job-status')
        expect(status).to_have_attribute("data-status", "succeeded", timeout=60_000)
        page.select_option("#search-collection", facts)
        page.fill("#search-query", "what moves the sea")
        page.fill("#search-topk", "3")
        page.click("#search-form button[type=submit]")
        expect(page.locator("#search-results li.result")).to_have_count(3)
        page.screenshot(path=str(out / f"console-collections-{name}.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert len(list(out.glob("console-*.png"))) >= 6
