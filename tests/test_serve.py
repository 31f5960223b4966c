"""infer.py --serve: the endpoint against infer.py's own results, its refusals and CLI errors, a soak
with the server's memory measured, and the page in headless Chromium drawing real MNIST digits."""
import base64
import contextlib
import glob
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import infer
import serve
from checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT, TINY_VIT, run_cli, tiny_weights_file
from data import CIFAR10
from photos import paper_photo
from strokes import digit_strokes, render
from webdriver import INSTALL, Browser, find_browser

SAMPLES = os.path.join(ROOT, "test_digit")
HAVE_MNIST = os.path.isfile(os.path.join(ROOT, "data", "MNIST", "raw", "t10k-images-idx3-ubyte.gz"))
ROW_KEYS = {"file", "pred", "label", "confidence", "probs", "top3", "figure"}  # one element of infer.py --json


def sample_paths():
    return [os.path.join(SAMPLES, n) for n in sorted(os.listdir(SAMPLES))]


def broken_images():
    """name -> bytes that infer.py reports as unreadable, each for its own reason."""
    with open(os.path.join(SAMPLES, "2_photo_rgb_1654.png"), "rb") as f:
        png = f.read()
    return {"empty.png": b"", "text.jpg": b"not a picture", "truncated.png": png[:len(png) // 2],
            "bad_header.png": png[:16] + b"\0" * 64, "gif_header.gif": b"GIF89a\x10\x00\x10\x00"}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """(path, model): random tiny weights with a history, as train.py leaves it after two epochs."""
    path = str(tmp_path_factory.mktemp("serve") / "mnist_tiny_final.pth")
    model = tiny_weights_file(path)
    ckpt = load_checkpoint(path)
    ckpt["epoch"], ckpt["history"] = 2, [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.61,
                                                                           "ema_val_acc": 0.625}]
    save_checkpoint(path, ckpt)
    return path, model


@contextlib.contextmanager
def serving(ckpt):
    """(host, port) of a server in this process, on a free port."""
    srv = serve.make_server("127.0.0.1", 0)
    srv.use(serve.Predictor(ckpt, "cpu"), "127.0.0.1")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[:2]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    with serving(tiny_ckpt[0]) as addr:
        yield addr


def request(addr, method, path, body=None, headers=None):
    """(status, response, JSON or bytes) over a new connection."""
    conn = http.client.HTTPConnection(*addr, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    is_json = (r.getheader("Content-Type") or "").startswith("application/json") and data
    return r.status, r, json.loads(data) if is_json else data


def raw(addr, text, done=True):
    """Send bytes as they are (no client fixes them up), then (done) no more; returns (status, JSON
    body, seconds taken)."""
    t = time.monotonic()
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(text.encode("latin-1"))
        if done:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body), time.monotonic() - t


def content_length(data):
    m = re.search(rb"Content-Length: (\d+)", data)
    return int(m.group(1)) if m else 0


def posted(addr, data):
    return request(addr, "POST", "/predict", data, {"Content-Type": "application/octet-stream"})


def decode_png(url):
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def still_serving(addr):
    with open(sample_paths()[0], "rb") as f:
        status, _, row = posted(addr, f.read())
    assert status == 200 and row["pred"] is not None


# ----------------------------------------------------------------------------------- the endpoint

def test_an_image_gets_the_row_that_infer_json_gives(server, tiny_ckpt, tmp_path, capsys):
    path, model = tiny_ckpt
    assert infer.main(["--images", SAMPLES, "--checkpoint", path, "--json", "--no-show",
                       "--output", str(tmp_path / "figures")]) == 0
    cli = {os.path.basename(r["file"]): r for r in json.loads(capsys.readouterr().out)}
    assert len(cli) == 10
    info = load_checkpoint(path)["data_info"]
    for f in sample_paths():
        with open(f, "rb") as fh:
            status, r, row = posted(server, fh.read())
        assert status == 200 and r.getheader("Content-Type") == "application/json"
        assert set(row) == ROW_KEYS | {"input_png"} and row["file"] == "upload" and row["figure"] is None
        want = cli[os.path.basename(f)]
        assert (row["pred"], row["label"]) == (want["pred"], want["label"])
        assert row["probs"] == pytest.approx(want["probs"], abs=2e-6)
        assert [k for k, _ in row["top3"]] == [k for k, _ in want["top3"]]
        seen = infer.prepare(infer.open_image(f), info)
        assert np.array_equal(decode_png(row["input_png"]), seen[0])  # the input the model saw, exactly
        probs = infer.predict(model, seen[None], info, 28, "cpu")[0]  # the saved weights' own answer
        assert row["probs"] == pytest.approx(probs.tolist(), abs=2e-6)


def test_a_colour_model_takes_photos(tmp_path):
    """A CIFAR-style checkpoint: RGB at its own size, no drawing, and still infer.py's answer."""
    path = str(tmp_path / "cifar10_tiny_final.pth")
    model = tiny_weights_file(path, model_args=dict(TINY_VIT, image_size=32, patch_size=8, in_channels=3))
    ckpt = load_checkpoint(path)
    ckpt["data_info"] = {"dataset": "cifar10", "classes": list(CIFAR10), "mean": [0.49, 0.48, 0.45],
                         "std": [0.25, 0.24, 0.26], "in_channels": 3, "digit_style": False, "native_size": 32}
    save_checkpoint(path, ckpt)
    photo = os.path.join(SAMPLES, "9_photo_rgb_1000.jpg")
    with serving(path) as addr:
        with open(photo, "rb") as f:
            status, _, row = posted(addr, f.read())
        page = request(addr, "GET", "/")[2].decode()
    seen = infer.prepare(infer.open_image(photo), ckpt["data_info"])
    assert seen.shape == (3, 32, 32) and status == 200 and row["label"] in CIFAR10
    assert np.array_equal(decode_png(row["input_png"]), seen.transpose(1, 2, 0))
    probs = infer.predict(model, np.stack([seen]), ckpt["data_info"], 32, "cpu")[0]
    assert row["probs"] == pytest.approx(probs.tolist(), abs=2e-6)
    about = json.loads(re.search(r"const MODEL = (.*);\n", page).group(1))
    assert about["draw"] is False and about["input"] == "32x32 RGB, resized"


def test_broken_images_get_400_with_infer_wording(server, tmp_path):
    for name, data in broken_images().items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as reason:
            infer.open_image(str(tmp_path / name))
        status, _, row = posted(server, data)
        assert status == 400 and row == infer.error_row("upload", str(reason.value)), name
        still_serving(server)
    texts = {posted(server, d)[2]["error"].split(" (")[0] for d in broken_images().values()}
    assert texts == {"empty file", "not an image that Pillow can read", "cannot decode"}


@pytest.mark.parametrize("method,path,code", [
    ("GET", "/predict", 405), ("POST", "/", 405), ("PUT", "/predict", 405), ("DELETE", "/", 405),
    ("OPTIONS", "/predict", 405), ("BREW", "/", 405),
    ("GET", "/etc/passwd", 404), ("GET", "/../config.yaml", 404), ("GET", "/static/x", 404),
    ("GET", "/predict/../../etc/passwd", 404), ("GET", "/%2e%2e/config.yaml", 404), ("GET", "/index.html", 404),
    ("POST", "/predict/x", 404), ("GET", "//etc/passwd", 404)])
def test_only_the_page_and_the_endpoint_are_served(server, method, path, code):
    status, r, body = request(server, method, path, b"x" if method in ("POST", "PUT") else None)
    assert status == code and "error" in body
    if code == 405:
        assert r.getheader("Allow") == ("POST" if path == "/predict" else "GET")
    still_serving(server)


def test_bodies_are_refused_before_they_are_read(server):
    """An oversized upload is refused on its Content-Length alone: the answer comes at once while
    the body is never sent. A whole oversized body (as curl sends it) gets the answer too."""
    status, body, took = raw(server, f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                                     f"{serve.MAX_BODY + 1}\r\n\r\n", done=False)
    assert status == 413 and "10 MB" in body["error"] and took < 0.9  # no wait for the body (the drain waits 1 s)
    status, _, body = posted(server, b"\0" * (serve.MAX_BODY + 1))
    assert status == 413
    cases = [("Content-Length: abc\r\n", "", 400), ("Content-Length: -5\r\n", "", 400), ("", "", 411),
             ("Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 4\r\n", "abcd", 415),
             ("Content-Length: 9\r\n", "short", 400), ("Content-Length: 0\r\n", "", 400)]
    for headers, data, code in cases:
        status, body, _ = raw(server, f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n{data}")
        assert status == code and body["error"], headers
        still_serving(server)
    for line in ("GET / HTTP/x", "GET / HTTP/2.0", "GET / HTTP/1.1 extra"):  # http.server's own refusals: JSON too
        status, body, _ = raw(server, line + "\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 400 and body["error"], line
    status, _, body = request(server, "GET", "/", headers={"Host": "rebound.example:8000"})
    assert status == 403 and "not this machine" in body["error"]
    assert request(server, "GET", "/", headers={"Host": "localhost:9000"})[0] == 200  # a tunnelled port is fine
    still_serving(server)


def test_the_page_describes_the_checkpoint(server, tiny_ckpt):
    status, r, page = request(server, "GET", "/?x=1")
    assert status == 200 and r.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "default-src 'none'" in r.getheader("Content-Security-Policy")
    page = page.decode()
    about = json.loads(re.search(r"const MODEL = (.*);\n", page).group(1))
    assert about["file"].endswith("mnist_tiny_final.pth") and about["dataset"] == "mnist"
    assert (about["accuracy"], about["accuracy_key"], about["epoch"]) == (0.625, "ema_val_acc", 2)
    assert about["draw"] and about["classes"] == [str(i) for i in range(10)] and about["weights"] == "raw"
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page) and "https://" not in page  # no CDN


def test_what_the_page_offers_follows_the_data_set(tiny_ckpt):
    ckpt = load_checkpoint(tiny_ckpt[0])
    for dataset, digit_style, draw in (("mnist", True, True), ("fashion_mnist", True, False),
                                       ("cifar10", False, False), ("folder", False, False)):
        ckpt["data_info"] = dict(ckpt["data_info"], dataset=dataset, digit_style=digit_style, native_size=32,
                                 classes=["a<script>", "b"])
        ckpt["history"] = [{"val_acc": 0.9}]
        about = serve.describe("x_final.pth", ckpt, "EMA", "cpu")
        assert about["draw"] is draw and about["accuracy"] == 0.9 and about["accuracy_key"] == "val_acc"
        assert ("RGB" in about["input"]) is (not digit_style) and about["input"].startswith("32x32")
        page = serve.page(about).decode()
        assert "a\\u003cscript>" in page and "<script>" not in page.split("const MODEL = ")[1]  # cannot end the script


def test_concurrent_requests_get_the_same_answers(server):
    images = [open(f, "rb").read() for f in sample_paths()[:4]]
    want = [posted(server, im)[2] for im in images]
    got, errors = {}, []

    def client(n):
        try:
            for k in range(3):
                got[(n, k)] = posted(server, images[(n + k) % 4])[2]
        except Exception as e:  # reported below, with the thread's number
            errors.append((n, e))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(got) == 24
    assert all(row == want[(n + k) % 4] for (n, k), row in got.items())


# -------------------------------------------------------------------------------------- the CLI

def test_cli_mistakes_are_one_line(tiny_ckpt, tmp_path, capsys):
    ckpt = tiny_ckpt[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        cases = [(["--port", "abc"], "--port abc: not a port number"), (["--port", "70000"], "not a port number"),
                 (["--port", "-1"], "not a port number"), (["--port", busy], f"port {busy} on 127.0.0.1 is in use"),
                 (["--host", "192.0.2.1", "--port", "0"], "cannot listen on 192.0.2.1:0"),
                 (["--checkpoint", str(tmp_path / "nope.pth")], "not found")]
        for extra, text in cases:
            args = ["--serve", "--checkpoint", ckpt, *extra]
            assert infer.main(args) == 2, extra
            out, err = capsys.readouterr()
            assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and text in err, (extra, err)
    assert all(map(serve.is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "app.localhost"]))
    assert not any(map(serve.is_loopback, ["0.0.0.0", "192.168.1.5", "::", "example.com", "localhost.example.com"]))


def start_server(ckpt, *extra, env=None):
    """`infer.py --serve` as a user starts it: (process, URL). Ctrl-C must work even where the
    test runner ignores SIGINT, as a terminal's foreground process gets it."""
    proc = subprocess.Popen([sys.executable, "infer.py", "--serve", "--port", "0", "--checkpoint", ckpt, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()
    m = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"no URL in {line!r}; stderr: {proc.communicate()[1][-2000:]}")
    return proc, m.group(1)


def stop(proc):
    """Ctrl-C; returns (exit code, rest of stdout, stderr)."""
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the server's memory from /proc")
def test_soak_mixed_requests_keep_memory_flat_and_ctrl_c_stops(tiny_ckpt):
    # glibc raises its mmap threshold after a big photo's buffers are freed, and later ones then stay
    # in the heap: RSS would step by ~20 MB with no leak. A fixed threshold returns them, so RSS
    # follows the memory in use.
    proc, url = start_server(tiny_ckpt[0], "--device", "cpu", env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    addr = ("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/")))
    digit = np.asarray(Image.open(os.path.join(SAMPLES, "5_mnist_7918.png")).convert("L"))
    canvas, photo = io.BytesIO(), io.BytesIO()
    render(digit_strokes(digit)).save(canvas, "PNG")  # what the page sends
    paper_photo(digit, np.random.default_rng(0), height=700, canvas=(1600, 1200)).save(photo, "JPEG", quality=90)
    good = [open(f, "rb").read() for f in sample_paths()] + [canvas.getvalue(), photo.getvalue()]
    calls = [(lambda d=d: posted(addr, d)[0], 200) for d in good]
    calls += [(lambda d=d: posted(addr, d)[0], 400) for d in broken_images().values()]
    calls += [(lambda: raw(addr, f"POST /predict HTTP/1.1\r\nContent-Length: {serve.MAX_BODY + 1}\r\n\r\n")[0], 413),
              (lambda: request(addr, "GET", "/")[0], 200), (lambda: request(addr, "GET", "/x/../../etc")[0], 404),
              (lambda: request(addr, "DELETE", "/predict")[0], 405)]
    try:
        warm = [(call(), want) for call, want in calls * 5]  # allocator pools, thread stacks, lazy imports
        statuses, rss = [], [rss_kb(proc.pid)]
        for chunk in range(10):
            statuses += [(call(), want) for call, want in (calls * 10)[20 * chunk:20 * chunk + 20]]
            rss.append(rss_kb(proc.pid))
    finally:
        code, out, err = stop(proc)
    assert all(got == want for got, want in warm + statuses), [s for s in warm + statuses if s[0] != s[1]][:5]
    counts = {c: sum(got == c for got, _ in statuses) for c in sorted({w for _, w in calls})}
    # the floor, so that a sample taken while a big photo is in memory does not count as growth
    growth = min(rss[-3:]) - min(rss[:3])
    print(f"soak: {len(statuses)} requests {counts}; RSS floor {min(rss[:3])} kB -> {min(rss[-3:])} kB "
          f"({growth:+d} kB), samples {rss}")
    assert growth < 2048, rss  # measured +0.01 to +0.3 MB; keeping each decoded image: +40 MB
    assert code == 0 and out == "stopped\n" and err == "", (code, out, err[-2000:])


# ----------------------------------------------------------------------------- a real browser

def train_mnist(folder):
    """A real model in ~30 s on the CPU: one epoch on 20k MNIST images (~96% val acc)."""
    r = run_cli(["train.py", "train.epochs=1", "data.train_limit=20000", "train.device=cpu",
                 f"checkpoint.dir={folder}/ckpt", f"log.dir={folder}/logs", "log.tensorboard=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    finals = glob.glob(os.path.join(folder, "ckpt", "**", "*_final.pth"), recursive=True)
    assert len(finals) == 1, finals
    return finals[0]


def settle(b, timeout=60):
    """The page's answer once it has caught up with the latest drawing or photo."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = b.run(SETTLED)
        if state:
            return state
        time.sleep(0.05)
    raise AssertionError(f"the page did not answer within {timeout} s")


SETTLED = """
const d = document.body.dataset;
if (d.version !== d.answered) return null;
const bars = [...document.querySelectorAll('#bars .bar')].map(r => ({label: r.dataset.label, prob: +r.dataset.prob,
  top: r.classList.contains('top'), width: r.querySelector('.fill').style.width}));
return {label: document.getElementById('label').textContent, bars: bars,
        error: document.getElementById('error').textContent, seen: document.getElementById('seen').src};
"""
DROP = """
const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], arguments[1], {type: arguments[2]}));
document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
"""


def check_bars(state):
    bars = state["bars"]
    probs = [b["prob"] for b in bars]
    assert len(bars) == 10 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)
    assert bars[0]["top"] and bars[0]["label"] == state["label"] and not any(b["top"] for b in bars[1:])
    assert all(float(b["width"].rstrip("%")) == pytest.approx(100 * b["prob"], abs=0.051) for b in bars)
    return {b["label"]: b["prob"] for b in bars}


def typical_digits():
    """One real MNIST test digit per class: the one nearest its class's mean image, chosen without
    the model, so that a test of the page is not a test of one odd handwriting."""
    from photos import mnist_test_digits
    digits, labels = mnist_test_digits()
    flat = digits.reshape(len(digits), -1).astype(np.float32)
    picks = []
    for k in range(10):
        idx = np.flatnonzero(labels == k)
        picks.append(int(idx[np.argmin(((flat[idx] - flat[idx].mean(0)) ** 2).sum(1))]))
    return digits[picks]


def use_the_page(b, folder):
    """Photos first (the file picker, a drop, a file that is no image), then a typical MNIST test
    digit of each class drawn with mouse, pen and touch in turn. Returns {file name: what the page
    showed}; the images it was shown are saved under those names in `folder`."""
    page = {}
    for name in ("0_photo_rgba_8195.png", "6_photo_l_8771.bmp"):
        shutil.copy(os.path.join(SAMPLES, name), folder / f"photo_{name}")
    b.send_file("#file", os.path.join(SAMPLES, "0_photo_rgba_8195.png"))
    page["photo_0_photo_rgba_8195.png"] = settle(b)
    with open(os.path.join(SAMPLES, "6_photo_l_8771.bmp"), "rb") as f:
        b.run(DROP, base64.b64encode(f.read()).decode(), "6.bmp", "image/bmp")
    page["photo_6_photo_l_8771.bmp"] = settle(b)
    b.run(DROP, base64.b64encode(b"not a picture").decode(), "notes.png", "image/png")
    broken = settle(b)
    assert "notes.png: not an image that Pillow can read" in broken["error"] and not broken["bars"]
    for k, digit in enumerate(typical_digits()):
        b.click("#clear")
        b.strokes("#pad", digit_strokes(digit), ("mouse", "pen", "touch")[k % 3])
        page[f"{k}_drawn.png"] = settle(b)
        png = b.run("return document.getElementById('pad').toDataURL('image/png')")
        (folder / f"{k}_drawn.png").write_bytes(base64.b64decode(png.split(",", 1)[1]))
    return page


@pytest.mark.slow
@pytest.mark.skipif(find_browser() is None, reason=INSTALL)
@pytest.mark.skipif(not HAVE_MNIST, reason="shipped MNIST not present")
def test_the_page_in_headless_chromium(tmp_path):
    """The page in a real browser, with a real model: its answers on photos and on ten real MNIST
    digits drawn on it must be infer.py --json's answers on the same images, and mostly right."""
    ckpt = os.environ.get("SERVE_CHECKPOINT") or train_mnist(tmp_path)  # e.g. the default run's final weights
    last, info = load_checkpoint(ckpt)["history"][-1], load_checkpoint(ckpt)["data_info"]
    folder = tmp_path / "images"
    folder.mkdir()
    proc, url = start_server(ckpt)
    try:
        with Browser(width=1000, height=760) as b:
            b.get(url)
            about = b.run("return document.getElementById('about').textContent")
            assert os.path.basename(ckpt) in about and "mnist" in about
            assert f"{100 * last.get('ema_val_acc', last['val_acc']):.2f}%" in about
            page = use_the_page(b, folder)
            b.screenshot(str(tmp_path / "serve.png"))
            if os.environ.get("SERVE_SCREENSHOT"):
                shutil.copy(tmp_path / "serve.png", os.environ["SERVE_SCREENSHOT"])
    finally:
        code, out, err = stop(proc)
    assert code == 0 and out == "stopped\n" and err == "", (code, out, err[-2000:])
    r = run_cli(["infer.py", "--images", str(folder), "--checkpoint", ckpt, "--json", "--no-show",
                 "--output", str(tmp_path / "figures")])
    assert r.returncode == 0, r.stderr
    cli = {os.path.basename(row["file"]): row for row in json.loads(r.stdout)}
    assert sorted(cli) == sorted(page)
    for name, row in cli.items():
        seen = page[name]
        assert seen["label"] == row["label"] and not seen["error"], name
        probs = check_bars(seen)
        assert [probs[c] for c in map(str, range(10))] == pytest.approx(row["probs"], abs=2e-6), name
        image = infer.open_image(str(folder / name))
        assert np.array_equal(decode_png(seen["seen"]), infer.prepare(image, info)[0])  # what the model saw
        if "drawn" in name:
            assert (np.asarray(image.convert("L")) < 128).mean() > 0.02, name  # every pointer type drew
    right = {name for name, row in cli.items() if row["label"] == name.removeprefix("photo_")[0]}  # class first
    drawn = sorted(n[0] for n in right if "drawn" in n)
    lowest = min(row["confidence"] for name, row in cli.items() if "drawn" in name)
    print(f"browser: {len(right)} of {len(cli)} right (drawn: {len(drawn)} of 10, {drawn}, lowest confidence "
          f"{lowest:.3f}); the page gave infer.py --json's answer on all {len(cli)}")
    assert {"photo_0_photo_rgba_8195.png", "photo_6_photo_l_8771.bmp"} <= right
    assert len(drawn) >= 9
