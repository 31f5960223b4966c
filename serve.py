"""A local page to try a checkpoint: draw a digit or drop a photo and see the prediction live.

    python infer.py --serve                                 newest final weights, http://127.0.0.1:8000/
    python infer.py --serve --checkpoint PATH --port 0      any free port; the URL is printed

GET / is the page. POST /predict takes an image's bytes as the raw body and answers with one
element of `infer.py --json` ("file" is "upload", "figure" is null) plus "input_png", the model's
input as a PNG data URL:

    curl --data-binary @test_digit/7_photo_rgba_5866.png http://127.0.0.1:8000/predict

Decoding, preprocessing and prediction are infer.py's own functions, so the page and
`infer.py --json` agree on the same image. Nothing else is served (404), a body over MAX_BODY is
refused before it is read (413), bad input gets a 4xx JSON error with infer.py's wording, and
the server goes on serving. See docs/serve.md.
"""
import base64
import errno
import http.server
import io
import ipaddress
import json
import os
import socket
import socketserver
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np

import infer
from checkpoint import load_trained
from utils import UserError, resolve_device

MAX_BODY = 10 * 1024 * 1024
IDLE_S = 30  # a connection that sends nothing for this long is closed, so stalled clients free their threads
HOST_HELP = "pass --host 127.0.0.1 (this machine only) or an address of this machine"


# ------------------------------------------------------------------------------------- the model

class Predictor:
    """The model behind a lock: one image at a time is decoded, prepared and predicted, which also
    bounds the memory that many large uploads at once can take."""

    def __init__(self, path, device):
        model, ckpt, kind = load_trained(path)
        self.model, self.device = model.to(device).eval(), device
        self.info, self.image_size = ckpt["data_info"], ckpt["model_args"]["image_size"]
        self.classes = list(self.info["classes"])
        self.about = describe(path, ckpt, kind, str(device))
        self.lock = threading.Lock()

    def __call__(self, body):
        """infer.py's JSON row for an image's bytes, plus the model's input; ValueError for a bad image."""
        with self.lock:
            im = infer.read_image(io.BytesIO(body))
            seen = infer.prepare(im, self.info)
            batch = np.stack([seen])  # (1, C, S, S), as predict_files stacks its batch
            probs = infer.predict(self.model, batch, self.info, self.image_size, self.device)[0]
        row = infer.prediction_row("upload", probs, self.classes, None)
        row["input_png"] = png_data_url(seen)
        return row


def describe(path, ckpt, kind, device):
    """What the page says about the checkpoint: its file (with the run's folder), data set and last accuracy."""
    info, last = ckpt["data_info"], (ckpt.get("history") or [{}])[-1]
    acc_key = "ema_val_acc" if "ema_val_acc" in last else "val_acc"
    rel = os.path.relpath(path)
    size = int(info["native_size"])
    if not info.get("digit_style"):
        how = f"{size}x{size} RGB, resized"
    elif info.get("dataset") == "fashion_mnist":
        how = f"{size}x{size} grey, light on black, cropped and scaled into the box"
    else:
        how = f"{size}x{size} grey, white ink on black, cropped to the ink, scaled into {round(size * 20 / 28)} px " \
              f"and centred on its mass, as MNIST was made"
    return {"file": path if rel.startswith("..") else rel, "dataset": info["dataset"],
            "classes": [str(c) for c in info["classes"]], "epoch": ckpt.get("epoch"),
            "accuracy": last.get(acc_key), "accuracy_key": acc_key, "weights": kind, "device": device,
            "draw": bool(info.get("digit_style")) and info.get("dataset") != "fashion_mnist", "input": how}


def png_data_url(seen):
    """uint8 (C, S, S) as a PNG data URL."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(seen[0] if seen.shape[0] == 1 else seen.transpose(1, 2, 0)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------ the server

def is_loopback(host):
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Handler(http.server.BaseHTTPRequestHandler):
    """GET / and POST /predict; any other request gets a JSON 4xx and the server goes on."""
    protocol_version = "HTTP/1.1"  # keep-alive: a page predicting as you draw reuses its connection
    server_version = "infer-serve"
    timeout = IDLE_S
    routes = {"/": "GET", "/predict": "POST"}

    def __getattr__(self, name):
        if name.startswith("do_"):  # HEAD, PUT, any verb: 404 or 405 below, never http.server's 501
            return self.refuse
        raise AttributeError(name)

    def version_string(self):
        return self.server_version

    def handle_expect_100(self):
        """Ask for the body only when it will be taken: a refused upload is answered before it is sent."""
        n = count(self.headers.get("Content-Length", ""), sys.maxsize)
        if self.command == "POST" and urlsplit(self.path).path == "/predict" and n is not None and n <= MAX_BODY:
            return super().handle_expect_100()
        return True

    def handle(self):
        try:
            super().handle()
        except OSError:  # the client went away mid-answer: there is no one to tell
            pass

    def log_message(self, format, *args):  # one line per request drowns the URL line; errors go to the client
        pass

    def refuse(self):
        """404 or 405, closing the connection: a body that came with the request is not read."""
        path = urlsplit(self.path).path
        allowed = self.routes.get(path)
        if allowed is None:
            return self.send_json(404, {"error": f"no such page: {path[:200]}; the page is GET / and the endpoint "
                                                 f"POST /predict"}, close=True)
        self.send_json(405, {"error": f"{self.command} {path}: use {allowed}"}, close=True, allow=allowed)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (malformed request line, headers too long) as JSON too, and
        as 4xx: a request this server cannot parse (HTTP/2.0 gets 505 there) is the client's to fix."""
        code = 400 if code >= 500 else code
        self.request_version = "HTTP/1.1"  # else a line it could not read gets no status line (as HTTP/0.9)
        self.send_json(code, {"error": message or self.responses.get(code, ("refused",))[0]}, close=True)

    def do_GET(self):
        if urlsplit(self.path).path != "/":
            return self.refuse()
        if self.foreign_host():
            return
        self.send_body(200, self.server.page, "text/html; charset=utf-8")

    def do_POST(self):
        if urlsplit(self.path).path != "/predict":
            return self.refuse()
        if self.foreign_host():
            return
        body = self.read_body()
        if body is None:
            return
        try:
            row = self.server.predictor(body)
        except ValueError as e:  # read_image's reasons, word for word as infer.py prints them
            return self.send_json(400, infer.error_row("upload", str(e)))
        except Exception as e:  # a bug, not the input: say so, and keep serving
            print(f"serve: /predict failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return self.send_json(500, {"error": f"prediction failed ({type(e).__name__}); see the server's output"})
        self.send_json(200, row)

    def foreign_host(self):
        """A page on another site that re-points its name at 127.0.0.1 (DNS rebinding) sends its own
        name as Host: a loopback server answers only to loopback names."""
        host = self.headers.get("Host")
        name = urlsplit(f"//{host}").hostname if host else None
        if not self.server.loopback or name is None or is_loopback(name):
            return False
        self.send_json(403, {"error": f"Host {host[:100]} is not this machine; open the URL that infer.py --serve "
                                      f"printed, or start it with --host to serve other names"}, close=True)
        return True

    def read_body(self):
        """The request body, or None after answering why it is not taken."""
        length = self.headers.get("Content-Length")
        if self.headers.get_content_maintype() == "multipart":
            return self.reject(415, "send the image's bytes as the raw body (curl --data-binary @photo.png), "
                                    "not as a form upload", count(length or "", MAX_BODY) or 0)
        if length is None:
            return self.reject(411, "Content-Length is missing; send the image's bytes as the body with its length")
        n = count(length, sys.maxsize)
        if n is None:
            return self.reject(400, f"Content-Length {length[:30]!r} is not a byte count")
        if n > MAX_BODY:
            return self.reject(413, f"the body of {n} bytes is over the {MAX_BODY >> 20} MB limit; send a smaller "
                                    f"image", n)
        try:
            body = self.rfile.read(n)
        except OSError:  # the client stalled past IDLE_S or went away
            return self.reject(408, f"the body did not arrive within {IDLE_S} s")
        if len(body) < n:
            return self.reject(400, f"the body ended after {len(body)} of {n} bytes")
        return body

    def reject(self, code, reason, unread=0):
        """Answer an error and close the connection. A body the client is still sending is read
        and dropped for a moment first: closing on unread data resets the connection, and the
        client would see the reset instead of the reason."""
        self.send_json(code, {"error": reason}, close=True)
        if unread:
            self.connection.settimeout(1.0)
            left, deadline = unread, time.monotonic() + 3.0
            try:
                while left > 0 and time.monotonic() < deadline:
                    chunk = self.rfile.read1(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:
                pass

    def send_json(self, code, obj, close=False, allow=None):
        self.send_body(code, json.dumps(obj).encode(), "application/json", close, allow)

    def send_body(self, code, data, content_type, close=False, allow=None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; frame-ancestors 'none'")
        if allow:
            self.send_header("Allow", allow)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for idle keep-alive connections
    allow_reuse_port = False  # a second server on a port in use fails instead of sharing it
    block_on_close = False

    def server_bind(self):  # HTTPServer's looks up the host's DNS name, which can stall offline
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def use(self, predictor, host):
        """What the handlers answer with: the predictor, the page, and whether to refuse foreign Host names."""
        self.predictor, self.page, self.loopback = predictor, page(predictor.about), is_loopback(host)

    def url(self):
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def make_server(host, port):
    """A bound server, or a UserError naming the cause and the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return type("Server", (Server,), {"address_family": family})((host.strip("[]"), port), Handler)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}; {HOST_HELP}") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; stop what holds it, or pass --port N "
                            f"(--port 0 picks a free one)") from None
        if e.errno == errno.EACCES:
            raise UserError(f"port {port} needs privileges; pass --port 1024 or higher") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); {HOST_HELP}") from None


def count(text, most):
    """A decimal count up to `most` from a header or flag, else None (no signs, spaces or other digits)."""
    text = str(text)
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 and int(text) <= most else None


def parse_port(text):
    port = count(text, 65535)
    if port is None:
        raise UserError(f"--port {text}: not a port number; pass 1-65535 (or 0 for any free port)")
    return port


def run(args):
    """infer.py --serve: load the checkpoint, print the URL and serve until Ctrl-C."""
    port = parse_port(args.port)
    path = infer.find_checkpoint(args.checkpoint)
    server = make_server(args.host, port)  # before the model loads: a port in use fails at once
    try:
        server.use(Predictor(path, resolve_device(args.device)), args.host)
        if not server.loopback:
            print(f"warning: --host {args.host} is not a loopback address: anyone who can reach this machine "
                  f"can use the page", file=sys.stderr, flush=True)
        about = server.predictor.about
        print(f"serving {about['file']} ({about['dataset']}, {len(about['classes'])} classes) on {about['device']} "
              f"at {server.url()}  (Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


# -------------------------------------------------------------------------------------- the page

def page(about):
    """The page with the checkpoint's description in it (as JSON that cannot end the script tag)."""
    return PAGE.replace("__MODEL__", json.dumps(about).replace("<", "\\u003c")).encode()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Try the model</title>
<link rel="icon" href="data:,">
<style>
:root { --ink: #1d2330; --muted: #667085; --line: #e4e7ec; --accent: #d92d20; --bar: #98a2b3; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #f6f7f9; }
header { padding: 18px 28px 6px; }
h1 { font-size: 20px; margin: 0 0 2px; }
#about { color: var(--muted); font-size: 13px; }
main { display: flex; flex-wrap: wrap; gap: 20px; padding: 12px 28px 28px; align-items: flex-start; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px; }
.col { display: flex; flex-direction: column; gap: 20px; }
h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 10px;
     font-weight: 600; }
#pad { width: 280px; height: 280px; display: block; background: #fff; border-radius: 6px; touch-action: none;
       outline: 1px solid #d0d5dd; cursor: crosshair; }
.row { display: flex; gap: 10px; margin-top: 12px; align-items: center; color: var(--muted); font-size: 13px; }
button { font: inherit; font-size: 14px; padding: 5px 16px; border: 1px solid #d0d5dd; border-radius: 6px;
         background: #fff; cursor: pointer; }
button:hover { background: #f2f4f7; }
#drop { display: block; margin-top: 16px; border: 2px dashed #d0d5dd; border-radius: 8px; padding: 14px;
        text-align: center; color: var(--muted); font-size: 13px; cursor: pointer; width: 280px; }
#drop.over { border-color: #2e90fa; background: #eff8ff; }
#drop u { color: #175cd3; white-space: nowrap; }
#about b { color: var(--ink); font-weight: 600; }
#file { position: absolute; width: 1px; height: 1px; opacity: 0; }
#photo[hidden] { display: none; }
#photo { max-width: 100%; max-height: 140px; display: block; margin: 10px auto 0; border-radius: 4px; }
body.photos #drawing { display: none; }
body.photos #drop { margin-top: 0; padding: 90px 20px; font-size: 15px; }
#result { width: 340px; min-height: 120px; }
#head { display: flex; align-items: baseline; gap: 12px; margin-bottom: 8px; min-height: 64px; }
#label { font-size: 54px; font-weight: 700; line-height: 1; }
#conf { color: var(--muted); font-size: 15px; }
#bars { display: grid; grid-template-columns: minmax(1.5em, max-content) 1fr 3.4em; gap: 7px 12px;
        align-items: center; font-size: 14px; }
.bar { display: contents; }
.bar .name { max-width: 11em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar .track { display: block; background: #f2f4f7; height: 12px; border-radius: 6px; overflow: hidden; }
.bar .fill { display: block; background: var(--bar); height: 100%; border-radius: 6px; min-width: 2px; }
.bar.top { font-weight: 600; }
.bar.top .fill { background: var(--accent); }
.bar .pct { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
.bar.top .pct { color: var(--ink); }
#seen-box { width: 168px; height: 168px; background: #000; border-radius: 4px; overflow: hidden; }
#seen { width: 168px; height: 168px; image-rendering: pixelated; display: block; }
#seen:not([src]) { visibility: hidden; }
#seen-note { color: var(--muted); font-size: 13px; max-width: 168px; margin: 8px 0 0; }
#error { color: var(--accent); font-size: 14px; }
.empty { color: var(--muted); grid-column: 1 / -1; }
</style></head>
<body>
<header><h1>Try the model</h1><div id="about"></div></header>
<main>
  <section class="card">
    <div id="drawing">
      <h2>Draw a digit</h2>
      <canvas id="pad" width="280" height="280"></canvas>
      <div class="row"><button id="clear" type="button">Clear</button><span>mouse, pen or finger</span></div>
    </div>
    <label id="drop"><span id="drop-text">or drop a photo here, or <u>choose a file</u></span>
      <input id="file" type="file" accept="image/*"><img id="photo" alt="your photo" hidden></label>
  </section>
  <section class="card" id="result"><h2>Prediction</h2>
    <div id="head"><span id="label"></span><span id="conf"></span></div>
    <div id="bars"></div><div id="error" role="alert"></div>
  </section>
  <section class="card"><h2>What the model sees</h2>
    <div id="seen-box"><img id="seen" alt="the model's input"></div><p id="seen-note"></p>
  </section>
</main>
<script>
"use strict";
const MODEL = __MODEL__;
const PEN = 20;  // px on the 280 px pad: about MNIST's 2 px stroke once the digit is scaled into 20 of 28 px
const $ = id => document.getElementById(id);
const pad = $("pad"), ctx = pad.getContext("2d"), body = document.body;
let source = null, sourceName = "", version = 0, shownFrom = 0, busy = false, again = false, timer = 0, last = null;

function about() {
  const m = MODEL, parts = [m.dataset, m.classes.length + " classes"];
  if (m.accuracy !== null && m.accuracy !== undefined)
    parts.push(`${m.accuracy_key === "ema_val_acc" ? "val acc (EMA)" : "val acc"} ${(100 * m.accuracy).toFixed(2)}%` +
               (m.epoch ? ` after epoch ${m.epoch}` : ""));
  parts.push(`${m.weights} weights on ${m.device}`);
  $("about").replaceChildren(Object.assign(document.createElement("b"), {textContent: m.file}),
                             ["", ...parts].join("  \\u00b7  "));
  $("seen-note").textContent = m.input;
  if (!m.draw) {
    body.classList.add("photos");
    $("drop-text").innerHTML = "Drop a photo here, or <u>choose a file</u>";
  }
}

function empty(text) {
  $("label").textContent = ""; $("conf").textContent = ""; $("error").textContent = "";
  $("bars").replaceChildren(Object.assign(document.createElement("div"), {className: "empty", textContent: text}));
  $("seen").removeAttribute("src");
}

function show(j) {
  $("error").textContent = "";
  $("label").textContent = j.label;
  $("label").style.fontSize = j.label.length > 5 ? "34px" : "";  // "automobile" still fits the card
  $("conf").textContent = (100 * j.confidence).toFixed(1) + "%";
  const order = j.probs.map((p, k) => [p, k]).sort((a, b) => b[0] - a[0]).slice(0, 10);
  $("bars").replaceChildren(...order.map(([p, k]) => {
    const row = document.createElement("div"), name = document.createElement("span");
    const track = document.createElement("span"), fill = document.createElement("span");
    const pct = document.createElement("span");
    row.className = "bar" + (k === j.pred ? " top" : "");
    row.dataset.label = MODEL.classes[k]; row.dataset.prob = p;
    name.className = "name"; name.textContent = MODEL.classes[k]; name.title = MODEL.classes[k];
    track.className = "track"; fill.className = "fill"; fill.style.width = (100 * p).toFixed(1) + "%";
    pct.className = "pct"; pct.textContent = (100 * p).toFixed(1) + "%";
    track.append(fill); row.append(name, track, pct);
    return row;
  }));
  $("seen").src = j.input_png;
}

async function predict() {
  if (!source) return;
  if (busy) { again = true; return; }
  busy = true;
  const v = version;
  try {
    const blob = await source();
    const r = await fetch("predict", {method: "POST", body: blob,
                                      headers: {"Content-Type": blob.type || "application/octet-stream"}});
    const j = await r.json();
    if (v >= shownFrom) { if (r.ok) show(j); else { empty(""); $("error").textContent = sourceName + j.error; } }
  } catch (e) {
    $("error").textContent = "no answer from the server (" + e.message + "); is infer.py --serve still running?";
  }
  busy = false;
  body.dataset.answered = source ? v : version;  // cleared meanwhile: nothing is left to answer
  if (again) { again = false; predict(); }
}

function changed(delay) {
  body.dataset.version = ++version;
  if (timer && delay) return;  // one is due soon and will see this change too: live updates while drawing
  clearTimeout(timer);
  timer = setTimeout(() => { timer = 0; predict(); }, delay);
}

function blank() {
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.lineCap = ctx.lineJoin = "round"; ctx.lineWidth = PEN; ctx.strokeStyle = ctx.fillStyle = "#111";
}

function clearAll() {
  blank(); source = null; $("photo").hidden = true;
  shownFrom = version + 1; changed(0);
  empty(MODEL.draw ? "draw a digit, or drop a photo" : "drop a photo, or choose a file");
  body.dataset.answered = version;
}

function at(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

pad.addEventListener("pointerdown", e => {
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  if (source !== padBlob) { blank(); $("photo").hidden = true; source = padBlob; sourceName = ""; }
  last = at(e);
  ctx.beginPath(); ctx.arc(last[0], last[1], PEN / 2, 0, 2 * Math.PI); ctx.fill();
  changed(150);
});
pad.addEventListener("pointermove", e => {
  if (!last) return;
  const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
  for (const c of events.length ? events : [e]) {
    const p = at(c);
    ctx.beginPath(); ctx.moveTo(last[0], last[1]); ctx.lineTo(p[0], p[1]); ctx.stroke();
    last = p;
  }
  changed(150);
});
for (const t of ["pointerup", "pointercancel"])
  pad.addEventListener(t, () => { if (last) { last = null; changed(0); } });

function padBlob() { return new Promise(resolve => pad.toBlob(resolve, "image/png")); }

function usePhoto(file) {
  if (!file) return;
  const photo = $("photo");
  if (photo.src) URL.revokeObjectURL(photo.src);
  photo.src = URL.createObjectURL(file); photo.hidden = false;
  blank(); source = () => Promise.resolve(file); sourceName = file.name + ": ";
  shownFrom = version + 1; changed(0);
}

$("photo").addEventListener("error", () => { $("photo").hidden = true; });  // the server says why
$("clear").addEventListener("click", clearAll);
$("file").addEventListener("change", e => { usePhoto(e.target.files[0]); e.target.value = ""; });
const drop = $("drop");
window.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
window.addEventListener("dragleave", e => { if (!e.relatedTarget) drop.classList.remove("over"); });
window.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
                                       usePhoto(e.dataTransfer.files[0]); });
about();
clearAll();
</script>
</body></html>
"""
