"""The web chat page (src/llmlab/serve/static/index.html) driven in headless chromium against the real server.

The browser is driven through the Chrome DevTools Protocol over its websocket (no selenium/playwright): the test
types into the page, clicks Send and Stop, and reads the DOM back with Runtime.evaluate. A screenshot of the
final page goes to tmp_path and to .artifacts/web_chat.png at the repository root.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium (or chromium-browser) is not on PATH; `make` installs Debian's chromium when run as "
                "root, or: apt-get install chromium", allow_module_level=True)
try:
    from llmlab.serve import create_app
except ImportError as e:
    pytest.skip(f"llmlab.serve cannot be imported ({e}); the web page needs the server", allow_module_level=True)
uvicorn = pytest.importorskip("uvicorn", reason="the server runs under uvicorn: pip install 'uvicorn[standard]'")
ws_client = pytest.importorskip("websockets.sync.client",
                                reason="CDP is spoken over a websocket: pip install websockets")

import torch  # noqa: E402

from llmlab.infer import LLM  # noqa: E402
from llmlab.model import ModelConfig, Transformer  # noqa: E402
from serve_helpers import chatml_tokenizer, running  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "nano-web-test"
TEXT = ("The quick brown fox jumps over the lazy dog. Hello there, how are you today? I am fine, thank you. "
        "A small model learns to chat one token at a time; **bold** words and `code` are rendered too. ") * 20


# ---- the server ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def serve(model, tok, **options):
    """The real app (llmlab.serve.create_app) on a free loopback port."""
    with running(create_app(LLM(model, tok), model_name=MODEL_NAME, **options)) as url:
        yield url


@pytest.fixture(scope="module")
def model_and_tok():
    torch.manual_seed(0)
    tok = chatml_tokenizer(TEXT)
    model = Transformer(ModelConfig.preset("nano", vocab_size=len(tok), max_seq_len=256)).eval()
    return model, tok


@pytest.fixture(scope="module")
def server_url(model_and_tok):
    with serve(*model_and_tok) as url:
        yield url


# ---- a minimal Chrome DevTools Protocol client -----------------------------------------------------------

class CDP:
    """Commands to one page over the browser's websocket (flattened target session)."""

    def __init__(self, ws):
        self.ws = ws
        self._ids = itertools.count(1)
        self.events: list[dict] = []
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 15):
        msg = {"id": next(self._ids), "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def open_page(self, width: int = 1100, height: int = 760) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def eval(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error in {expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15, what: str = "", interval: float = 0.02):
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or expression}; page state: "
                                     f"{self.eval(STATE)}")
            time.sleep(interval)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13,
                                                 **({"text": "\r"} if kind == "keyDown" else {})})

    def type(self, selector: str, text: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", {"text": text})

    def screenshot(self, *paths: Path) -> None:
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


@pytest.fixture
def browser(tmp_path):
    """A headless chromium with one page open; yields its CDP client. Chromium is killed whatever happens."""
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--no-proxy-server",
         "--mute-audio", "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def drain():  # keeps reading so a chatty chromium never blocks on a full pipe
        for line in proc.stderr:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        ws_url = None
        while ws_url is None:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise RuntimeError("chromium did not print its DevTools websocket URL:\n" + "".join(log[-30:]))
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                ws_url = m.group(1)
        with ws_client.connect(ws_url, max_size=None, open_timeout=10) as ws:
            cdp = CDP(ws)
            cdp.open_page()
            yield cdp
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


# ---- page helpers ----------------------------------------------------------------------------------------

STATE = """JSON.stringify({
  state: document.body.dataset.state,
  roles: [...document.querySelectorAll('#messages .msg')].map(m => m.classList.contains('user') ? 'user' : 'assistant'),
  last: (() => { const a = [...document.querySelectorAll('#messages .msg.assistant .content')].pop();
                 return a ? a.textContent : null; })(),
  usage: document.getElementById('usage').textContent,
  error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
})"""


def state(cdp: CDP) -> dict:
    return json.loads(cdp.eval(STATE))


def set_value(cdp: CDP, element_id: str, value) -> None:
    cdp.eval(f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); "
             f"e.value = {json.dumps(str(value))}; e.dispatchEvent(new Event('input')); }})()")


IDS = ["messages", "input", "send", "stop", "system", "temperature", "top-p", "max-tokens", "model-name", "usage",
       "reset", "error", "api-key"]


def load(cdp: CDP, url: str) -> None:
    """Open the chat page and wait until it has loaded, with every control the tests use."""
    cdp.send("Page.navigate", {"url": url + "/"})
    cdp.wait_for(f"location.href === {json.dumps(url + '/')} && document.readyState === 'complete' && "
                 f"{json.dumps(IDS)}.every(i => document.getElementById(i)) && !!window.llmlabChat",
                 what="the page and all its controls")


LAST_REPLY = ("(() => { const a = [...document.querySelectorAll('#messages .msg.assistant .content')].pop(); "
              "return a ? a.textContent : ''; })()")


# ---- the test --------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_web_chat_streams_stops_and_renders(server_url, browser, tmp_path):
    cdp = browser
    shots = (tmp_path / "web_chat.png", REPO / ".artifacts" / "web_chat.png")
    try:
        load(cdp, server_url)
        # the model's name comes from /v1/models
        cdp.wait_for(f"document.getElementById('model-name').textContent === {json.dumps(MODEL_NAME)}",
                     what="the model name")

        # The markdown renderer escapes model text before adding its own tags.
        html = cdp.eval("llmlabChat.renderMarkdown('<img src=x onerror=alert(1)> **bold** *it* `a<b` "
                        "x\\n```py\\nif a < b:\\n    pass\\n```\\nend')")
        assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
        assert "<strong>bold</strong>" in html and "<em>it</em>" in html and "<code>a&lt;b</code>" in html
        assert '<pre><code class="language-py">if a &lt; b:\n    pass</code></pre>' in html
        assert "<br>end" in html

        # 1. a complete reply, streamed: typed into #input, sent with the Send button
        set_value(cdp, "system", "You are a tiny test model.")
        set_value(cdp, "temperature", 0)
        set_value(cdp, "top-p", 1)
        set_value(cdp, "max-tokens", 12)
        cdp.type("#input", "Hello there")
        cdp.eval("document.getElementById('send').click()")
        cdp.wait_for("document.body.dataset.state === 'idle' && document.getElementById('usage').textContent !== ''",
                     what="the first reply and its usage")
        s = state(cdp)
        assert s["error"] is None, s
        assert s["roles"] == ["user", "assistant"], s
        assert s["last"].strip(), f"the assistant reply is empty: {s}"
        prompt_tokens = int(cdp.eval("document.getElementById('usage').dataset.promptTokens"))
        completion_tokens = int(cdp.eval("document.getElementById('usage').dataset.completionTokens"))
        assert prompt_tokens > 0 and 0 < completion_tokens <= 12, s
        assert re.search(rf"prompt {prompt_tokens}\b.*completion {completion_tokens}\b", s["usage"]), s
        assert cdp.eval("document.getElementById('input').value") == ""

        # 2. Stop: a long reply, aborted as soon as text streams in; the partial reply stays and stops growing.
        cdp.eval("document.getElementById('reset').click()")
        assert state(cdp)["roles"] == [] and state(cdp)["usage"] == ""
        set_value(cdp, "max-tokens", 150)
        cdp.type("#input", "Tell me a long story")
        cdp.press_enter()  # Enter sends
        cdp.wait_for("document.body.dataset.state === 'streaming' && !document.getElementById('stop').hidden",
                     what="streaming to start", interval=0.005)
        cdp.wait_for(f"{LAST_REPLY}.length > 0", what="the first streamed text", interval=0.005)
        cdp.eval("document.getElementById('stop').click()")
        cdp.wait_for("document.body.dataset.state === 'idle'", what="the page to leave the streaming state")
        partial = cdp.eval(LAST_REPLY)
        time.sleep(0.8)
        s = state(cdp)
        assert s["last"] == partial and partial, f"the reply kept growing after Stop: {partial!r} -> {s}"
        assert s["error"] is None and s["usage"] == "", s  # aborted before the usage chunk
        assert "(stopped)" in cdp.eval("[...document.querySelectorAll('#messages .msg.assistant')].pop().textContent")
        assert cdp.eval("document.getElementById('stop').hidden && !document.getElementById('send').disabled")
        assert cdp.eval("document.activeElement === document.getElementById('input')")

        # 3. ready for the next message; the partial reply is part of the history sent
        set_value(cdp, "max-tokens", 5)
        cdp.type("#input", "And then?")
        cdp.press_enter()
        cdp.wait_for("document.body.dataset.state === 'idle' && document.getElementById('usage').textContent !== ''",
                     what="the reply after Stop")
        s = state(cdp)
        assert s["error"] is None and s["roles"] == ["user", "assistant"] * 2, s
        assert cdp.eval("llmlabChat.history().length") == 4
        assert cdp.eval("llmlabChat.history()[1].content") == partial

        # 4. API errors are shown in the page (and the turn goes back into the input box)
        set_value(cdp, "max-tokens", -3)
        cdp.type("#input", "bad request")
        cdp.press_enter()
        cdp.wait_for("!document.getElementById('error').hidden", what="the API error to show")
        cdp.wait_for("document.body.dataset.state === 'idle'", what="idle after the error")
        assert cdp.eval("document.getElementById('input').value") == "bad request"
        assert state(cdp)["roles"] == ["user", "assistant"] * 2
        set_value(cdp, "max-tokens", 5)

        errors = [e for e in cdp.events if e["method"] == "Runtime.exceptionThrown"]
        assert not errors, f"uncaught page errors: {errors}"
    finally:
        try:
            cdp.screenshot(*shots)
        except Exception:
            pass


@pytest.mark.timeout(60)
def test_web_chat_api_key(model_and_tok, browser):
    """With a key, the page itself is behind it: without credentials the server answers 401 with a Basic
    challenge (the browser's password prompt); with the key as the Basic password the page loads, and the
    browser sends the same credentials with the page's API calls."""
    import base64

    import httpx

    cdp = browser
    with serve(*model_and_tok, api_key="sesame") as url:
        page = httpx.get(url + "/")
        assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/", auth=("anyone", "wrong")).status_code == 401
        assert httpx.get(url + "/", auth=("anyone", "sesame")).status_code == 200
        basic = "Basic " + base64.b64encode(b"anyone:sesame").decode()
        cdp.send("Network.enable")
        cdp.send("Network.setExtraHTTPHeaders", {"headers": {"Authorization": basic}})
        try:
            load(cdp, url)
            cdp.wait_for(f"document.getElementById('model-name').textContent === {json.dumps(MODEL_NAME)}",
                         what="the model name with the key")
            assert cdp.eval("document.getElementById('error').hidden")
            set_value(cdp, "max-tokens", 4)
            set_value(cdp, "temperature", 0)
            cdp.type("#input", "Hi")
            cdp.press_enter()
            cdp.wait_for("document.body.dataset.state === 'idle' && "
                         "document.getElementById('usage').textContent !== ''", what="a reply with the key")
            s = state(cdp)
            assert s["error"] is None and s["roles"] == ["user", "assistant"] and s["last"], s
        finally:
            cdp.send("Network.setExtraHTTPHeaders", {"headers": {}})
