"""A small W3C WebDriver client over urllib, enough to drive headless Chromium through chromedriver
in tests with nothing beyond the standard library: open a page, run a script, find and click
elements, give a file input a file, pointer strokes (mouse, pen, touch) and screenshots."""
import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the key W3C WebDriver names an element reference by
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "headless Chromium not found: apt-get install chromium chromium-driver"


def find_browser():
    """(browser, chromedriver) paths, or None when either is missing."""
    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriverError(RuntimeError):
    pass


class Browser:
    """One headless Chromium session; use as a context manager so the driver always stops."""

    def __init__(self, width=1180, height=800):
        browser, driver = find_browser()
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        # Chromium leaves its scoped_dir folders in TMPDIR: give it one of its own, removed on close
        self.tmp = tempfile.mkdtemp(prefix="webdriver-")
        self.driver = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": self.tmp})
        try:
            self._wait_ready()
            args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--force-device-scale-factor=1", f"--window-size={width},{height}", "--no-first-run"]
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                     "goog:chromeOptions": {"binary": browser, "args": args}}}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except Exception:
            self.driver.kill()
            self.driver.wait()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except (OSError, WebDriverError):
                pass
            time.sleep(0.1)
        raise WebDriverError(f"chromedriver did not start within {timeout} s")

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            value = json.loads(e.read() or b"{}").get("value", {})
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message', '')[:500]}") from None

    def cmd(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url):
        self.cmd("POST", "/url", {"url": url})

    def run(self, script, *args):
        """The value of a script's `return`; element references in args are passed as elements."""
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def element(self, css):
        """A reference to pass to run()."""
        return {ELEMENT: self.find(css)}

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def send_file(self, css, path):
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": path})

    def strokes(self, css, strokes, pointer="mouse", size=None):
        """Draw polylines [[(x, y), ...], ...] of element pixels (from its top-left corner) with a
        pointer of type mouse, pen or touch, one press per polyline."""
        el = self.find(css)
        w, h = size or self.run("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];",
                                {ELEMENT: el})

        def move(x, y):  # offsets from the element's centre, as the protocol counts them
            return {"type": "pointerMove", "duration": 0, "origin": {ELEMENT: el},
                    "x": int(round(x - w / 2)), "y": int(round(y - h / 2))}

        actions = []
        for line in strokes:
            actions += [move(*line[0]), {"type": "pointerDown", "button": 0}]
            actions += [move(x, y) for x, y in line[1:]] + [{"type": "pointerUp", "button": 0}]
        self.cmd("POST", "/actions", {"actions": [{"type": "pointer", "id": f"draw-{pointer}",
                                                   "parameters": {"pointerType": pointer}, "actions": actions}]})
        self.cmd("DELETE", "/actions")

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.cmd("GET", "/screenshot")))

    def close(self):
        try:
            self.cmd("DELETE", "")
        except (OSError, WebDriverError):
            pass
        self.driver.terminate()
        try:
            self.driver.wait(10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            self.driver.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
