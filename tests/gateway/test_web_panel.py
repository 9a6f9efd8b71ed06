"""The web panel at / in a real browser (headless Chromium + Playwright) against a real gateway and the fake engine.

Every test drives the page as a user would (clicks, form fields) and checks what the page shows and what the gateway
did. Set SAGE_LLM_SCREENSHOTS=DIR to save the screenshots that docs/img/panel-*.png come from.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from sage_llm.observe import gpu
from tests.conftest import free_port
from tests.fakes.fake_hub import FakeHub, Repo
from tests.fakes.fake_nvml import FakeGpu, FakeNVML, FakeProc, GiB
from tests.fakes.fake_openai import FakeOpenAI
from tests.gateway import browser
from tests.gateway.conftest import MODEL_A, MODEL_B, engine_starts

pytestmark = pytest.mark.timeout(180)
SHOTS = os.environ.get("SAGE_LLM_SCREENSHOTS")


@pytest.fixture(scope="module")
def chromium():
    path = browser.require()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=browser.ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(chromium):
    ctx = chromium.new_context(viewport={"width": 1280, "height": 860})
    p = ctx.new_page()
    p.set_default_timeout(30_000)
    problems: list[str] = []
    p.on("console", lambda m: problems.append(m.text) if m.type == "error" and "Failed to load resource"
         not in m.text else None)  # script errors, CSP violations; HTTP errors are in `refused`
    refused: list[tuple[int, str]] = []
    p.on("response", lambda r: refused.append((r.status, r.url.split("/", 3)[-1])) if r.status >= 400 else None)
    p.refused = refused  # type: ignore[attr-defined]
    p.on("pageerror", lambda e: problems.append(str(e)))
    p.problems = problems  # type: ignore[attr-defined]
    yield p
    ctx.close()


@pytest.fixture
def fake_gpu():
    nv = FakeNVML([FakeGpu(total=80 * GiB, used=3 * GiB, util=37)])
    gpu.set_backend(nv)
    yield nv
    gpu.reset()


def shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"panel-{name}.png"), full_page=True)


def until(page: Any, expr: str) -> None:
    """Wait for a JS expression to be true (as a function: the page's CSP forbids evaluating strings)."""
    page.wait_for_function(f"() => ({expr})")


def tab(page: Any, name: str) -> None:
    page.click(f"button.tab[data-tab={name}]")


def watch_progress(page: Any) -> None:
    """Record every stage and percentage the progress box shows (a MutationObserver, before the start click)."""
    page.evaluate("""() => {
        window.__seen = [];
        const box = document.querySelector('#start-progress');
        const note = () => window.__seen.push([box.dataset.stage, document.querySelector('#progress-pct').textContent,
                                               document.querySelector('#progress-stage').textContent]);
        new MutationObserver(note).observe(box, {attributes: true, subtree: true, childList: true,
                                                 characterData: true});
    }""")


def test_page_is_served_offline_with_a_strict_csp(gateway) -> None:
    gw = gateway()
    r = gw.client.get("/")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    html = r.text
    assert "<script>" not in html
    assert "http://" not in html
    assert "https://" not in html
    for asset, ctype in (("app.js", "text/javascript"), ("app.css", "text/css")):
        a = gw.client.get(f"/static/{asset}")
        assert a.status_code == 200
        assert a.headers["content-type"].startswith(ctype)
        assert "https://" not in a.text
        assert "http://" not in a.text
    assert gw.client.get("/static/../server.py").status_code == 404
    assert gw.client.get("/static/nothing.js").status_code == 404
    # the same Host check as every route (DNS rebinding)
    assert gw.client.get("/", headers={"Host": "evil.example"}).status_code == 403


def test_start_progress_chat_monitor_logs_stop(gateway, page, fake_gpu, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_LOAD_S", "3")
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY_S", "0.05")
    gw = gateway()
    page.goto(gw.url + "/")
    page.wait_for_selector(f"#start-model option[value='{MODEL_A}']", state="attached")
    opts = page.eval_on_selector_all("#start-model option", "os => os.map(o => o.textContent)")
    assert any("Qwen/Qwen2.5-7B-Instruct (recommended)" in o for o in opts)
    assert any("Qwen/Qwen2.5-1.5B-Instruct (low VRAM)" in o for o in opts)
    assert any(o.startswith(MODEL_A) for o in opts)
    assert any(o.startswith(MODEL_B) for o in opts)
    slider = page.locator("#gpu-util")
    assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.get_attribute("step"),
            slider.input_value()) == ("0.5", "0.95", "0.05", "0.9")
    assert page.locator("#source-local").is_disabled()  # nothing ready: local cannot be chosen
    shot(page, "start-form")

    page.select_option("#start-model", MODEL_A)
    page.fill("#gpu-util", "0.8")
    until(page, "document.querySelector('#gpu-util-gb').textContent === '(64.0 of 80 GB on GPU 0)'")
    port = free_port()
    page.fill("#start-port", str(port))
    watch_progress(page)
    page.click("#start-btn")
    assert page.locator("#start-btn").is_disabled()
    page.wait_for_selector("#start-progress[data-stage=loading_weights]")
    until(page, "/^\\d+%$/.test(document.querySelector('#progress-pct').textContent)")  # a live percentage
    shot(page, "starting")
    page.wait_for_selector("#start-progress[data-stage=ready]")
    seen = page.evaluate("window.__seen")
    stages = [s for s, _pct, _label in seen]
    assert "loading_weights" in stages
    assert stages[-1] == "ready"
    assert stages.index("loading_weights") < stages.index("ready")
    assert any(label == "loading weights" and pct.endswith("%") for s, pct, label in seen if s == "loading_weights")
    assert not page.locator("#start-btn").is_disabled()
    # the gateway started it with the form's values
    rec = next(e for e in gw.client.get("/api/engines").json()["engines"] if e["model"] == MODEL_A)
    assert rec["port"] == port
    assert rec["managed_by_gateway"]
    assert not rec["external"]
    assert rec["gpu_memory_utilization"] == 0.8

    fake_gpu.processes[0] = [FakeProc(rec["pid"], 6 * GiB)]  # the engine now holds 6 GiB on GPU 0
    fake_gpu.devices[0].used = 9 * GiB
    card = page.locator(f".engine-card[data-engine='{rec['name']}']")
    card.wait_for()
    until(page, f"document.querySelector('.engine-card[data-engine=\"{rec['name']}\"]').textContent"
                f".includes('6.00 GB')")
    text = card.inner_text()
    assert MODEL_A in text
    assert str(port) in text
    assert "Uptime" in text
    # the context the engine serves (the fake model's 2048 fits its KV cache)
    until(page, f"document.querySelector('.engine-card[data-engine=\"{rec['name']}\"] dd.context').textContent"
                " === '2,048 tokens'")
    assert "GPU memory" in text
    assert card.locator(".stop-btn").is_visible()
    page.wait_for_selector("#status[data-state=ready]")
    assert "local engine running" in page.inner_text("#status-text")
    shot(page, "engines")

    # chat through the local engine: streamed, who answered, TTFT and tokens/s
    tab(page, "chat")
    page.wait_for_selector("#source-local:not([disabled])")
    assert page.locator("#local-tag").is_visible()
    page.check("#source-local")
    page.fill("#chat-input", "Say hello")
    page.click("#chat-send")
    until(page, "document.querySelector('.msg.assistant .content')?.textContent.length > 0 && "
                "!document.querySelector('.msg.assistant').dataset.done")  # caught mid-stream
    answer = page.locator(".msg.assistant[data-done='1']")
    answer.wait_for()
    assert answer.get_attribute("data-source") == "local"
    assert answer.get_attribute("data-engine") == rec["name"]
    meta = answer.locator(".meta").inner_text()
    pattern = rf"local · {re.escape(rec['name'])} · TTFT \d+\.\d\d s · \d+\.\d tokens/s · \d+ tokens$"
    assert re.match(pattern, meta), meta
    assert answer.locator(".content").inner_text().strip()
    shot(page, "chat")

    # monitoring: GPU and engine charts receive data; the log follows
    tab(page, "monitor")
    until(page, "Number(document.querySelector('[data-chart=gpu0-mem]')?.dataset.points) >= 2")
    until(page, "Number(document.querySelector('[data-chart=gpu0-util]')?.dataset.points) >= 2")
    assert "util: 37 %" in page.inner_text("[data-chart=gpu0-util] .now")
    key = rec["name"]
    until(page, f"Number(document.querySelector('[data-chart=\"{key}-kv\"]')?.dataset.points) >= 2")
    until(page, f"Number(document.querySelector('[data-chart=\"{key}-req\"]')?.dataset.points) >= 2")
    until(page, "document.querySelector('#log').textContent.includes('Starting vLLM server')")
    # load from elsewhere: the charts show it, the followed log shows its requests
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            while not stop.is_set():
                c.post("/v1/chat/completions", json={"model": MODEL_A, "stream": True, "max_tokens": 30,
                                                     "messages": [{"role": "user", "content": "hi"}]}).read()

    workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        until(page, f"Number(document.querySelector('[data-chart=\"{key}-gen\"]')?.dataset.peak) > 0")
        until(page, f"Number(document.querySelector('[data-chart=\"{key}-req\"]')?.dataset.peak) >= 1")
        until(page, f"Number(document.querySelector('[data-chart=\"{key}-kv\"]')?.dataset.peak) > 0")
        until(page, "document.querySelector('#log').textContent.includes('POST /v1/chat/completions')")
        if SHOTS:
            time.sleep(8)  # a few more seconds of curve for the screenshot
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    shot(page, "monitor")

    # models: size and serving engine; removal refused while served
    tab(page, "models")
    row = page.locator(f"tr[data-model='{MODEL_A}']")
    row.wait_for()
    assert rec["name"] in row.inner_text()
    size = next(m["size_on_disk"] for m in gw.client.get("/api/models").json()["models"] if m["repo_id"] == MODEL_A)
    assert f"{size / 1024:.1f} KB" in row.inner_text()  # the size `sage llm models` shows
    fit = page.inner_text("#recommended-table tr[data-model='Qwen/Qwen2.5-7B-Instruct'] .fit")
    assert fit == next(r["fit"] for r in gw.client.get("/api/models").json()["recommended"]
                       if r["repo_id"] == "Qwen/Qwen2.5-7B-Instruct")
    assert fit
    page.on("dialog", lambda d: d.accept())
    row.locator(".rm-btn").click()
    until(page, "document.querySelector('#models-error').textContent.includes('served by')")
    assert MODEL_A in [m["repo_id"] for m in gw.client.get("/api/models").json()["models"]]
    shot(page, "models")

    # stop from its card
    tab(page, "engines")
    card.locator(".stop-btn").click()
    card.wait_for(state="detached")
    page.wait_for_selector("#status[data-state=idle]")
    assert not [e for e in gw.client.get("/api/engines").json()["engines"] if e["model"] == MODEL_A]
    tab(page, "chat")
    page.wait_for_selector("#source-local[disabled]")
    assert page.problems == []  # type: ignore[attr-defined]
    assert page.refused == [(409, "api/models/remove")]  # type: ignore[attr-defined]


def test_failed_start_shows_the_diagnosis_and_next_step(gateway, page, fake_gpu, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "load")
    monkeypatch.setenv("FAKE_VLLM_FAIL_TEXT", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    gw = gateway()
    page.goto(gw.url + "/")
    page.wait_for_selector(f"#start-model option[value='{MODEL_A}']", state="attached")
    page.select_option("#start-model", MODEL_A)
    page.click("#start-btn")
    page.wait_for_selector("#start-error:not(.hidden)")
    text = page.inner_text("#start-error-text")
    assert "out of memory" in text.lower()
    hint = page.inner_text("#start-error-hint")
    assert hint.startswith("Next step: ")
    assert len(hint) > len("Next step: ") + 5
    assert "(hint:" not in text
    assert not page.locator("#start-btn").is_disabled()
    assert page.locator("#start-progress").is_hidden()
    shot(page, "failed")
    assert gw.client.get("/v1/models").json()["data"][0]["state"] in ("failed", "available")


def test_auto_source_falls_back_to_the_cloud(gateway, page, monkeypatch) -> None:
    cloud = FakeOpenAI(key="sk-cloud", models=("gpt-test",)).start()
    cloud.tokens = ["Hello", " from", " the", " cloud", "."]
    cloud.delay_s = 0.05
    try:
        monkeypatch.setenv("SAGE_CHAT_BASE_URL", cloud.base_url)
        monkeypatch.setenv("SAGE_CHAT_API_KEY", "sk-cloud")
        monkeypatch.setenv("SAGE_CHAT_MODEL", "gpt-test")
        gw = gateway()
        page.goto(gw.url + "/")
        tab(page, "chat")
        assert page.locator("#source-local").is_disabled()
        assert page.locator("#local-hint").is_visible()
        assert page.locator("#local-tag").is_hidden()
        assert page.is_checked("input[name=source][value=auto]")
        page.fill("#chat-input", "hi")
        page.press("#chat-input", "Enter")
        answer = page.locator(".msg.assistant[data-done='1']")
        answer.wait_for()
        assert answer.locator(".content").inner_text() == "Hello from the cloud."
        assert answer.get_attribute("data-source") == "cloud"
        assert answer.locator(".meta").inner_text().startswith("cloud · cloud · TTFT ")
        assert cloud.requests[-1]["model"] == "gpt-test"
        assert engine_starts(Path(os.environ["SAGE_LLM_HOME"])) == 0  # auto loaded nothing local
    finally:
        cloud.stop()


def test_pull_with_progress_then_remove(gateway, page, monkeypatch) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "quantization_config": {"quant_method": "gptq", "bits": 4}}
    hub = FakeHub(repos={"org/remote": Repo({"config.json": json.dumps(config).encode(),
                                             "model.safetensors": b"w" * 3_000_000})}).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        gw = gateway()
        page.goto(gw.url + "/")
        tab(page, "models")
        page.wait_for_selector(f"tr[data-model='{MODEL_A}']")
        page.fill("#pull-model", "org/remote")
        page.click("#pull-btn")
        page.wait_for_selector(".pull[data-model='org/remote'][data-state=done]")
        page.wait_for_selector("tr[data-model='org/remote']")
        assert "MB" in page.inner_text("tr[data-model='org/remote']")
        # the new model is offered in the start form too
        page.wait_for_selector("#start-model option[value='org/remote']", state="attached")
        assert "gptq" in page.inner_text("tr[data-model='org/remote']")
        tab(page, "engines")
        page.select_option("#start-model", "org/remote")
        assert page.inner_text("#start-quant") == "gptq (from the model's config)"
        tab(page, "models")
        page.on("dialog", lambda d: d.accept())
        page.locator("tr[data-model='org/remote'] .rm-btn").click()
        page.wait_for_selector("tr[data-model='org/remote']", state="detached")
        assert "org/remote" not in [m["repo_id"] for m in gw.client.get("/api/models").json()["models"]]
        # a bad id: the refusal is shown
        page.fill("#pull-model", "not-a-repo")
        page.click("#pull-btn")
        page.wait_for_selector(".pull[data-model='not-a-repo'][data-state=failed]")
    finally:
        hub.stop()


class _Foreign(BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_page_on_another_origin_cannot_drive_the_api(gateway, page, home) -> None:
    gw = gateway()
    target = gw.url
    body = json.dumps({"model": MODEL_A})
    _Foreign.page = f"""<!doctype html><html><body><script>
    const T = {json.dumps(target)}, B = {json.dumps(body)};
    async function attempt(name, fn) {{
      try {{ const r = await fn(); return name + ":" + (r.type === "opaque" ? "opaque" : r.status); }}
      catch (e) {{ return name + ":blocked"; }}
    }}
    window.results = Promise.all([
      attempt("json", () => fetch(T + "/api/local-engine/start", {{method: "POST",
                     headers: {{"Content-Type": "application/json"}}, body: B}})),
      attempt("text", () => fetch(T + "/api/local-engine/start", {{method: "POST", mode: "no-cors",
                     headers: {{"Content-Type": "text/plain"}}, body: B}})),
      attempt("pull", () => fetch(T + "/api/models/pull", {{method: "POST", mode: "no-cors", body: B}})),
      attempt("read", () => fetch(T + "/api/status")),
      attempt("chat", () => fetch(T + "/v1/chat/completions", {{method: "POST",
                     headers: {{"Content-Type": "application/json"}}, body: B}})),
    ]);
    </script></body></html>""".encode()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{srv.server_address[1]}/")
        results = page.evaluate("window.results")
    finally:
        srv.shutdown()
        srv.server_close()
    # JSON needs a CORS preflight the gateway never grants; the rest are refused (415) before anything runs
    assert results == ["json:blocked", "text:opaque", "pull:opaque", "read:blocked", "chat:blocked"], results
    time.sleep(1.0)
    assert engine_starts(home) == 0
    cards = httpx.get(target + "/v1/models").json()["data"]
    assert all(c["state"] == "available" for c in cards), cards
    assert gw.gw.web.pulls == {}


def test_an_external_engine_is_shown_as_such_without_stop(gateway, page) -> None:
    import subprocess
    import sys

    from tests.conftest import FAKE_VLLM

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE_VLLM), "serve", "hand/started", "--port", str(port)],
                            env=dict(os.environ, FAKE_VLLM_LOAD_S="0.1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # ready before the gateway looks (the panel's display is under test here, not the router's adoption of an
        # external engine still loading)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        gw = gateway(external=True)
        page.goto(gw.url + "/")
        card = page.locator(f".engine-card[data-engine='external-{port}']")
        card.wait_for(timeout=30_000)
        page.wait_for_selector(f".engine-card[data-engine='external-{port}'][data-state=ready]")
        assert "external" in card.locator("h3").inner_text()
        assert "hand/started" in card.inner_text()
        assert card.locator(".stop-btn").count() == 0
        assert "not stopped from here" in card.inner_text()
        # the chat page may use it: local is enabled while an engine is ready
        tab(page, "chat")
        page.wait_for_selector("#source-local:not([disabled])")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait()


def test_a_gateway_with_an_api_key_asks_for_it_once(gateway, page, monkeypatch) -> None:
    monkeypatch.setenv("PANEL_TEST_GW_KEY", "sk-panel-secret")
    gw = gateway(api_key_env="PANEL_TEST_GW_KEY")
    assert gw.client.get("/api/engines").status_code == 401  # the data needs the key; the page's files do not
    assert gw.client.get("/").status_code == 200
    assert gw.client.get("/static/app.js").status_code == 200
    assert gw.client.get("/static/nothing.js").status_code == 401
    page.goto(gw.url + "/")
    page.wait_for_selector("#key-box:not(.hidden)")
    page.fill("#key-input", "sk-wrong")
    page.click("#key-btn")
    page.wait_for_load_state()
    until(page, "document.querySelector('#key-error').textContent === 'wrong key'")
    page.fill("#key-input", "sk-panel-secret")
    page.click("#key-btn")
    page.wait_for_load_state()
    page.wait_for_selector("#status[data-state=idle]")
    assert page.locator("#key-box").is_hidden()
    # start with live progress (the event stream carries the key too), chat, log follow
    page.wait_for_selector(f"#start-model option[value='{MODEL_A}']", state="attached")
    page.select_option("#start-model", MODEL_A)
    page.click("#start-btn")
    page.wait_for_selector("#start-progress[data-stage=ready]")
    tab(page, "chat")
    page.wait_for_selector("#source-local:not([disabled])")
    page.fill("#chat-input", "hi")
    page.click("#chat-send")
    answer = page.locator(".msg.assistant[data-done='1']")
    answer.wait_for()
    assert answer.get_attribute("data-source") == "local"
    tab(page, "monitor")
    until(page, "document.querySelector('#log').textContent.includes('POST /v1/chat/completions')")
    assert "sk-panel-secret" not in page.url
