"""The web page end to end: a real server and worker, driven through Debian's headless Chromium (Playwright)."""

import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "benchmarks" / "results" / "serve" / "web.png"
PROMPT = "a large red circle moving left on a black background"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """uvicorn on a free port plus one worker thread, both on the bundled shapes model."""
    import uvicorn

    from vidiffuse.serve import ServeSettings
    from vidiffuse.serve.app import create_app
    from vidiffuse.serve.worker import run_worker

    home = tmp_path_factory.mktemp("web-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VIDIFFUSE_HOME", str(home))  # the signing certificate goes here too, never to ~/.vidiffuse
        settings = ServeSettings(home=home, monitor=False)
        app = create_app(settings)
        _, key = app.state.keys.create_key("web", rate_per_minute=100)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # bound here and handed over: no race for the port
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        server_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        stop = threading.Event()
        worker = threading.Thread(target=run_worker, kwargs={"settings": settings, "stop": stop}, daemon=True)
        server_thread.start()
        worker.start()
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline and server_thread.is_alive(), "the server never started"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", key, app.state.keys
        stop.set()
        server.should_exit = True
        worker.join(60)
        server_thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service):
    """A fresh browser profile; fails the test on script errors, CSP refusals or any request off this server."""
    base, *_ = service
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    # the browser logs every 4xx as "Failed to load resource"; the wrong key and bad inputs below cause some
    page.on("console", lambda msg: problems.append(f"console: {msg.text}")
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.on("request", lambda request: problems.append(f"off-site request: {request.url}")
            if not request.url.startswith((base, "blob:", "data:")) else None)
    yield page
    context.close()
    assert not problems, problems


def enter_key(page, key: str) -> None:
    page.fill("#key-input", key)
    page.press("#key-input", "Enter")


def wait_for_status(page, status: str, timeout_s: float = 120.0) -> None:
    """Generation takes ~2 s on two idle cores, far longer on a busy CI machine: wait generously, say why."""
    try:
        page.wait_for_selector(f"#job-state[data-status={status}]", timeout=timeout_s * 1000)
    except sync_api.TimeoutError:
        pytest.fail(f"no {status!r} after {timeout_s:.0f} s; the page says: {page.text_content('#job-status')!r}")


def open_settings(page) -> None:
    if not page.evaluate("document.getElementById('settings').open"):  # the page remembers it open or closed
        page.click("#settings summary")


def test_a_creator_generates_a_video_sees_progress_and_a_signed_watermarked_result(page, service):
    base, key, _ = service
    api_calls: list[str] = []  # "METHOD /path" of every API request the page makes
    page.on("request", lambda r: api_calls.append(f"{r.method} {r.url.removeprefix(base)}")
            if "/v1/" in r.url else None)
    page.goto(base + "/")
    assert page.title().startswith("vidiffuse")

    # every form control is labelled (screen readers, voice control), the page asks for a key first
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id || e.name)""")
    assert unlabelled == []
    assert page.is_visible("#key-input") and page.is_hidden("#workspace")

    enter_key(page, "vdf_not-a-real-key")
    page.wait_for_selector("#key-error:has-text('did not accept')")
    assert page.is_hidden("#workspace")
    enter_key(page, key)
    page.wait_for_selector("#workspace", state="visible")
    assert page.evaluate("localStorage.getItem('vidiffuse.apiKey')") == key
    page.wait_for_selector("#gallery-empty:has-text('No videos yet')")

    # a bad setting comes back with the server's own one-line message, and the field is marked
    page.fill("#prompt", PROMPT)
    open_settings(page)
    page.fill("#steps", "150")
    page.click("#generate")
    page.wait_for_selector("#form-error:has-text('steps: at most 100 on this server')")
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    page.fill("#steps", "8")
    page.fill("#prompt", "   ")  # a blank prompt is caught before anything is sent
    page.click("#generate")
    page.wait_for_selector("#form-error:has-text('Write a prompt first')")
    assert page.get_attribute("#prompt", "aria-invalid") == "true"
    assert page.get_attribute("#steps", "aria-invalid") is None

    # a good request, sent from the keyboard (Ctrl+Enter in the prompt); the progress bar is watched as it moves
    page.fill("#seed", "7")
    page.fill("#prompt", PROMPT)
    page.evaluate("""() => {
        window.progressSeen = [];
        const bar = document.getElementById('progress');
        new MutationObserver(() => window.progressSeen.push(bar.value))
            .observe(bar, {attributes: true, attributeFilter: ['value']});
        window.statusesSeen = [];
        const panel = document.getElementById('job-state');
        new MutationObserver(() => window.statusesSeen.push(panel.dataset.status))
            .observe(panel, {attributes: true, attributeFilter: ['data-status']});
    }""")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#cancel", state="visible")  # a Cancel button while the job waits or runs
    wait_for_status(page, "succeeded")
    assert page.is_visible("#form-error") is False
    seen = page.evaluate("window.progressSeen")
    assert seen[-1] == 1 and any(0 < value < 1 for value in seen), seen
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert "running" in page.evaluate("window.statusesSeen")
    assert page.text_content("#job-status").startswith("Done")
    assert page.is_hidden("#cancel")

    # the player holds the MP4 (fetched with the key, played from a blob URL) and the browser can decode it
    page.wait_for_function("() => { const v = document.getElementById('player');"
                           " return v.readyState >= 1 && v.duration > 0; }")
    player = page.evaluate("() => { const v = document.getElementById('player');"
                           " return {src: v.src, duration: v.duration, width: v.videoWidth, height: v.videoHeight}; }")
    assert player["src"].startswith("blob:") and player["duration"] > 0
    assert (player["width"], player["height"]) == (64, 64)
    assert page.get_attribute("#download", "href").startswith("blob:")

    # the gallery lists it with a provenance badge: watermark detected and a valid C2PA manifest
    item = page.wait_for_selector("#gallery li.gallery-item[data-status=succeeded]")
    assert PROMPT in item.text_content()
    badge = page.wait_for_selector("#gallery li[data-status=succeeded] .badge.ok")
    assert badge.get_attribute("data-watermark") == "detected" and badge.get_attribute("data-manifest") == "valid"
    assert badge.text_content() == "AI-generated · watermark ✓ · C2PA signed (dev cert)"
    page.wait_for_function("() => { const v = document.querySelector('#gallery video.thumb');"
                           " return v && v.readyState >= 1 && v.duration > 0; }")
    page.wait_for_selector("#player-provenance .badge.ok")
    assert page.locator("#gallery li").count() == 1
    job_id = item.get_attribute("data-job-id")
    assert f"GET /v1/videos/{job_id}/events" in api_calls
    assert f"GET /v1/videos/{job_id}" not in api_calls  # the event stream alone carried the progress

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # a reload remembers the key and shows the gallery again; a phone-sized screen needs no sideways scrolling
    page.reload()
    page.wait_for_selector("#gallery li[data-status=succeeded] .badge.ok")
    assert page.is_hidden("#key-section") and page.is_hidden("#player-figure")
    page.click("#gallery li[data-status=succeeded] button:has-text('Watch')")
    page.wait_for_function("() => document.getElementById('player').readyState >= 1")
    assert page.text_content("#player-caption") == PROMPT
    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.set_viewport_size({"width": 1280, "height": 900})

    # Cancel stops a long job, followed this time by polling because the event stream is cut
    page.route("**/events", lambda route: route.abort())
    page.fill("#prompt", "a small blue square moving up on a white background")
    open_settings(page)
    page.fill("#steps", "100")
    page.click("#generate")
    wait_for_status(page, "running")
    page.click("#cancel")
    wait_for_status(page, "cancelled")
    cancelled = page.wait_for_selector("#gallery li[data-status=cancelled]")
    assert page.locator("#gallery li").count() == 2
    job_id = cancelled.get_attribute("data-job-id")
    assert f"DELETE /v1/videos/{job_id}" in api_calls
    assert api_calls.count(f"GET /v1/videos/{job_id}") >= 2  # polled once a second after the stream failed

    # forgetting the key removes it from the browser and hides the videos
    page.click("#forget-key")
    page.wait_for_selector("#key-input", state="visible")
    assert page.evaluate("localStorage.getItem('vidiffuse.apiKey')") is None
    assert page.is_hidden("#gallery-section") and page.locator("#gallery li").count() == 0


def test_static_files_are_served_without_anything_from_outside(service):
    import httpx

    base, *_ = service
    page = httpx.get(base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = httpx.get(base + asset)
        assert response.status_code == 200 and kind in response.headers["content-type"]
    text = page.text + httpx.get(base + "/static/app.js").text + httpx.get(base + "/static/style.css").text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_the_event_stream_parser_handles_any_chunking(page, service):
    """Events split across network chunks, CRLF line ends, comments and multi-line data, as the SSE spec allows."""
    base, *_ = service
    page.goto(base + "/")
    events = page.evaluate("""async () => {
        const chunks = [': keep-alive\\n\\n', 'event: jo', 'b\\r\\ndata: {"a"', ': 1}\\r\\n\\r', '\\n',
                        'data: line one\\ndata:line two\\n', '\\nevent: job\\ndata: {"done": true}\\n\\n', 'data: cut'];
        const body = new ReadableStream({start(c) {
            for (const chunk of chunks) c.enqueue(new TextEncoder().encode(chunk));
            c.close();
        }});
        const seen = [];
        for await (const event of readServerSentEvents(new Response(body))) seen.push(event);
        return seen;
    }""")
    assert events == [{"event": "job", "data": '{"a": 1}'}, {"event": "message", "data": "line one\nline two"},
                      {"event": "job", "data": '{"done": true}'}]  # an event never ended by a blank line is dropped


def test_a_revoked_key_sends_the_creator_back_to_the_key_form(page, service):
    base, _, keys = service
    _, secret = keys.create_key("soon-revoked")
    page.goto(base + "/")
    page.evaluate("key => localStorage.setItem('vidiffuse.apiKey', key)", secret)
    page.reload()
    page.wait_for_selector("#workspace", state="visible")
    keys.revoke_key("soon-revoked")
    page.click("#refresh-gallery")
    page.wait_for_selector("#key-error:has-text('did not accept the saved key')")
    assert page.is_hidden("#workspace") and page.evaluate("localStorage.getItem('vidiffuse.apiKey')") is None
