"""Headless Debian chromium driven over the DevTools protocol (shared by the browser tests)."""
import asyncio
import base64
import json
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


