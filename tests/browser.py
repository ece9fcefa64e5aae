"""Headless Debian chromium driven over the DevTools protocol (shared by the browser tests)."""
import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Just enough of the Chrome DevTools Protocol: evaluate, mouse, screenshot, reload."""

    def __init__(self, exe):
        self.profile = tempfile.mkdtemp(prefix="afa-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "--window-size=1400,1000",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        self.ws_url = None
        while time.monotonic() < deadline and self.ws_url is None:
            line = self.proc.stderr.readline()
            if "DevTools listening on" in line:
                self.ws_url = line.split("DevTools listening on", 1)[1].strip()
        if self.ws_url is None:
            self.close()
            raise RuntimeError("chromium did not start")
        self.loop = asyncio.new_event_loop()
        self.msg_id = 0
        self.loop.run_until_complete(self._connect())

    async def _connect(self):
        import aiohttp
        self.session = aiohttp.ClientSession()
        port = self.ws_url.split(":")[2].split("/")[0]
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def _reconnect(self):
        await self.ws.close()
        await self.session.close()
        await self._connect()

    async def _send(self, method, params=None):
        self.msg_id += 1
        my_id = self.msg_id
        await self.ws.send_str(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("method") == "Page.javascriptDialogOpening":  # e.g. "leave site?" on reload
                self.msg_id += 1
                await self.ws.send_str(json.dumps({"id": self.msg_id, "method": "Page.handleJavaScriptDialog",
                                                   "params": {"accept": True}}))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def send(self, method, params=None, timeout=120.0):
        return self.loop.run_until_complete(asyncio.wait_for(self._send(method, params), timeout))

    def eval(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression, timeout=120.0, what=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
            except RuntimeError as e:  # the page is (re)loading
                if "navigated" not in str(e) and "context" not in str(e).lower():
                    raise
                value = None
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what or expression}")

    def screenshot(self, path):
        # after a page reload headless chromium can stall or refuse a capture ("Not attached to an
        # active page": the reload swapped the renderer): reconnect to the page, retry once
        for attempt in range(2):
            try:
                self.send("Page.bringToFront")
                data = self.send("Page.captureScreenshot", {"format": "png", "fromSurface": True}, timeout=45)["data"]
                break
            except (asyncio.TimeoutError, RuntimeError):
                if attempt:
                    raise
                self.loop.run_until_complete(self._reconnect())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))

    def mouse(self, x, y):
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def close(self):
        if getattr(self, "loop", None) is not None:
            async def shut():
                await self.ws.close()
                await self.session.close()
            self.loop.run_until_complete(shut())
            self.loop.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)




# ---------------------------------------------------------------- gradio pages (AFA Studio)
# Helpers the studio's chromium tests share (tests/test_studio_*browser*.py, test_studio_features.py).
# `b` is a Browser on the studio page; elem_id is a component's gradio elem_id.

def open_page(b, url, ready, timeout=90.0, what="the page"):
    """Navigate to `url` and wait until the JS expression `ready` is true."""
    b.send("Page.enable")
    b.send("Page.navigate", {"url": url})
    return b.wait_for(ready, timeout=timeout, what=what)


STUDIO_READY = ("!!document.querySelector('#afa-generate') && "
                "document.querySelector('#afa-status')?.innerText.startsWith('Idle')")


def open_tab(b, name):
    b.eval(f"[...document.querySelectorAll('[role=tab]')].find(t => t.textContent.trim() === {json.dumps(name)})"
           ".click()")
    b.wait_for(f"[...document.querySelectorAll('[role=tab]')].find(t => t.textContent.trim() === "
               f"{json.dumps(name)})?.getAttribute('aria-selected') === 'true'", timeout=10, what=f"tab {name}")


def text(b, elem_id):
    return b.eval(f"document.querySelector('#{elem_id}')?.innerText ?? ''")


def pick(b, elem_id, value):
    """Type a value into a gradio dropdown and press Enter (multiselect: adds it)."""
    b.eval(f"(() => {{ const i = document.querySelector('#{elem_id} input'); i.focus(); i.select(); }})()")
    b.send("Input.insertText", {"text": value})  # replaces a single-select dropdown's value
    for kind in ("keyDown", "keyUp"):
        b.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13})
    b.eval(f"document.querySelector('#{elem_id} input').blur()")


def choose(b, elem_id, names):
    """Make a multiselect dropdown hold exactly `names` (they are added when missing)."""
    tokens = f"[...document.querySelectorAll('#{elem_id} .token')].map(t => t.innerText.trim())"
    for name in names:
        if name not in b.eval(tokens):
            pick(b, elem_id, name)
    assert b.eval(tokens) == list(names)


def select(b, elem_id, value):
    """Choose `value` in a single-select gradio dropdown by clicking its option."""
    if b.eval(f"document.querySelector('#{elem_id} input').value") == value:
        return
    options = (f"[...(document.getElementById(document.querySelector('#{elem_id} input')"
               ".getAttribute('aria-controls'))?.querySelectorAll('li') ?? [])]")
    b.eval(f"(() => {{ const i = document.querySelector('#{elem_id} input'); i.blur(); i.focus(); i.click(); "
           "i.value = ''; i.dispatchEvent(new Event('input', {bubbles: true})); })()")  # all options, unfiltered
    b.wait_for(f"{options}.some(li => li.innerText.trim() === {json.dumps(value)})", timeout=10,
               what=f"option {value} in #{elem_id}")
    b.eval(f"(() => {{ const li = {options}.find(li => li.innerText.trim() === {json.dumps(value)}); "
           "for (const t of ['mousedown', 'mouseup', 'click']) li.dispatchEvent(new MouseEvent(t, {bubbles: true}));"
           " })()")
    b.eval(f"document.querySelector('#{elem_id} input').blur()")
    b.wait_for(f"document.querySelector('#{elem_id} input').value === {json.dumps(value)}", timeout=10,
               what=f"{value} chosen in #{elem_id}")


def set_number(b, elem_id, value):
    """Set a gradio Number / Slider's number box (as typing then leaving it does)."""
    b.wait_for(f"!!document.querySelector('#{elem_id} input[type=number]')", timeout=10, what=f"#{elem_id}")
    b.eval(f"(() => {{ const i = document.querySelector('#{elem_id} input[type=number]'); i.value = '{value}';"
           " i.dispatchEvent(new Event('input', {bubbles: true})); i.dispatchEvent(new Event('change', "
           "{bubbles: true})); i.blur(); })()")


def set_text(b, elem_id, value):
    """Set a gradio Textbox (as typing then leaving it does)."""
    field = f"document.querySelector('#{elem_id} textarea, #{elem_id} input')"
    b.wait_for(f"!!{field}", timeout=10, what=f"#{elem_id}")
    b.eval(f"(() => {{ const t = {field}; t.value = {json.dumps(value)}; "
           "t.dispatchEvent(new Event('input', {bubbles: true})); t.blur(); })()")


def toast(b, contains, timeout=30):
    """Wait for a toast holding `contains`; return its text and close every toast."""
    found = b.wait_for(f"[...document.querySelectorAll('.toast-body')].map(t => t.innerText)"
                       f".find(t => t.includes({json.dumps(contains)})) ?? null", timeout=timeout,
                       what=f"a message containing {contains!r}")
    b.eval("document.querySelectorAll('.toast-close').forEach(c => c.click())")
    b.wait_for("document.querySelectorAll('.toast-body').length === 0", timeout=15, what="the toasts to close")
    return found


def shot(b, tmp_path, name):
    """Screenshot into the test's tmp dir and test-artifacts/; a rendered page, not a blank one."""
    for folder in (tmp_path, ARTIFACTS):
        b.screenshot(Path(folder) / name)
    assert (Path(tmp_path) / name).stat().st_size > 10_000


def upload(b, elem_id, path):
    """Put a file into a gradio Image's file input (as choosing it in the file dialog does)."""
    doc = b.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
    node = b.send("DOM.querySelector", {"nodeId": doc, "selector": f"#{elem_id} input[type=file]"})["nodeId"]
    assert node, f"no file input in #{elem_id}"
    b.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]})
    b.wait_for(f"!!document.querySelector('#{elem_id} img')", timeout=30, what=f"the image in #{elem_id}")


def open_accordion(b, title, inside):
    """Open the accordion headed `title` (it holds #`inside`) unless it is open."""
    shown = f"(document.querySelector('#{inside}')?.offsetParent ?? null) !== null"
    if not b.eval(shown):
        b.eval(f"[...document.querySelectorAll('button, .label-wrap')].filter(e => e.innerText.trim()"
               f".startsWith({json.dumps(title)})).pop()?.click()")
    b.wait_for(shown, timeout=10, what=f"the accordion {title!r} open")


def gallery_captions(b, elem_id="afa-gallery"):
    return b.eval(f"[...document.querySelectorAll('#{elem_id} .caption-label')].map(c => c.innerText)")


def gallery_files(b, elem_id="afa-gallery"):
    """The files a gallery shows (its image URLs point at the saved files: /file=<path>)."""
    from urllib.parse import unquote
    srcs = b.eval(f"[...document.querySelectorAll('#{elem_id} img')].map(i => i.src)")
    return [Path(unquote(re.search(r"/file=(.*?)(\?|$)", src).group(1))) for src in srcs]


def run_generation(b, count, timeout=120):
    """Press Generate and wait for a NEW gallery of `count` images and the idle status; -> captions."""
    srcs = "JSON.stringify([...document.querySelectorAll('#afa-gallery img')].map(i => i.src))"
    before = b.eval(srcs)
    b.eval("document.querySelector('#afa-generate').click()")
    b.wait_for(f"{srcs} !== {json.dumps(before)} && document.querySelectorAll('#afa-gallery img').length === {count}",
               timeout=timeout, what=f"{count} new images")
    b.wait_for("document.querySelector('#afa-status').innerText.startsWith('Idle')", timeout=30)
    return gallery_captions(b)
