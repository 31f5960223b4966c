"""infer.py on photo-like images, broken files, --json and GPU-style checkpoints."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import infer
from conftest import MNIST_INFO, ROOT, tiny_weights_file
from photos import STYLES, encode, fine_pen, mnist_test_digits, paper_photo, to_mode

HAVE_MNIST = os.path.isfile(os.path.join(ROOT, "data", "MNIST", "raw", "t10k-images-idx3-ubyte.gz"))


def reopen(im, fmt):
    """The image as a user's file gives it back: encoded in `fmt`, then decoded."""
    return Image.open(io.BytesIO(encode(im, fmt)))


def centre_of_mass(x):
    ys, xs = np.indices(x.shape)
    x = x.astype(np.float64)
    return (x * ys).sum() / x.sum(), (x * xs).sum() / x.sum()


def ink_extent(x, level=100):
    rows, cols = np.flatnonzero((x > level).any(1)), np.flatnonzero((x > level).any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def sheet_with_box(W, H, mode, fmt, wide=False):
    """A hollow dark box twice as tall as wide (or as wide as tall), near the top-left of an
    unevenly lit grey sheet."""
    rng = np.random.default_rng(0)
    a = np.full((H, W), 225.0) + np.linspace(-20, 10, W)[None] + rng.normal(0, 5, (H, W))
    x0, y0 = W // 8, H // 6
    h, w = (min(H, W) // 4, min(H, W) // 2) if wide else (H // 2, H // 4)
    a[y0:y0 + h, x0:x0 + w] = 30
    a[y0 + h // 4:y0 + 3 * h // 4, x0 + w // 4:x0 + 3 * w // 4] = 225
    return reopen(to_mode(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB"), mode), fmt)


# -------------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("size,wide", [((300, 200), False), ((60, 90), False), ((1600, 1200), True), ((90, 400), True)])
@pytest.mark.parametrize("mode,fmt", sorted(set(STYLES)))
def test_dark_on_light_is_inverted_cropped_scaled_and_centred(size, wide, mode, fmt):
    x = infer.prepare(sheet_with_box(*size, mode, fmt, wide), MNIST_INFO)
    assert x.shape == (1, 28, 28) and x.dtype == np.uint8
    x = x[0]
    assert x[:2].max() == 0 and x[-2:].max() == 0 and x[:, :2].max() == 0 and x[:, -2:].max() == 0  # black around
    assert x.max() > 240  # ink is white
    extent = ink_extent(x)[::-1] if wide else ink_extent(x)
    assert extent in ((20, 10), (20, 11), (21, 10))  # longer side 20 px, aspect kept
    cy, cx = centre_of_mass(x)
    assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6


@pytest.mark.skipif(not HAVE_MNIST, reason="shipped MNIST not present")
def test_photos_of_real_digits_come_back_as_the_mnist_digit():
    """Paper photos of real MNIST test digits (every mode and format, 40-300 px, off-centre, noisy,
    blurred, one on a transparent sheet) prepare into nearly the original 28x28 digit."""
    digits, _ = mnist_test_digits()
    rng = np.random.default_rng(1)
    corr = []
    for n, (mode, fmt) in enumerate(STYLES):
        d = digits[n * 7]
        photo = paper_photo(d, rng, height=[40, 90, 150, 300][n % 4], blur=0.8, noise=6,
                            transparent=mode == "RGBA" and n == 2)
        x = infer.prepare(reopen(to_mode(photo, mode), fmt), MNIST_INFO)[0]
        corr.append(np.corrcoef(x.ravel().astype(float), d.ravel().astype(float))[0, 1])
        cy, cx = centre_of_mass(x)
        assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6, (mode, fmt)
    assert min(corr) > 0.85 and np.median(corr) > 0.93, corr
    # an MNIST image itself (white on black) is not inverted and comes back unchanged
    same = infer.prepare(Image.fromarray(digits[0]), MNIST_INFO)[0]
    assert np.abs(same.astype(int) - digits[0]).mean() < 3


@pytest.mark.skipif(not HAVE_MNIST, reason="shipped MNIST not present")
def test_a_fine_pen_on_a_large_photo_is_widened_to_mnist_stroke():
    """A digit written with a fine pen on a 560 px photo shrinks to a faint hair unless the stroke
    is widened first; a pen already as wide as MNIST's is left alone."""
    digits, _ = mnist_test_digits()
    raw, widened, bare, corr = [], [], [], []
    for d in digits[:20]:
        fine = fine_pen(d, 560)
        x = infer.prepare(fine, MNIST_INFO)[0]
        raw.append(d.mean()), widened.append(x.mean()), bare.append(infer.mnist_style(fine, pen=None).mean())
        corr.append(np.corrcoef(x.ravel().astype(float), d.ravel().astype(float))[0, 1])
        big = Image.fromarray(d).resize((560, 560), Image.BICUBIC)
        thick = Image.fromarray(255 - np.asarray(big.point(lambda v: 255 if v > 100 else 0)))  # MNIST's pen
        assert np.array_equal(infer.prepare(thick, MNIST_INFO)[0], infer.mnist_style(thick, pen=None))
    ink, ink_bare = np.mean(widened) / np.mean(raw), np.mean(bare) / np.mean(raw)
    assert 0.8 < ink < 1.25 and ink_bare < 0.6, (ink, ink_bare)  # measured: 1.03 and 0.37
    assert np.median(corr) > 0.8, corr


def test_blank_page_gives_an_empty_input():
    x = infer.prepare(Image.new("RGB", (120, 90), (230, 228, 220)), MNIST_INFO)
    assert x.shape == (1, 28, 28) and x.max() == 0


# ------------------------------------------------------------------------------------- the CLI

def photo_folder(folder):
    """Four good images in different modes and formats, two broken ones and a file that is no image."""
    os.makedirs(folder)
    for i, (mode, fmt) in enumerate([("L", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "BMP")]):
        im = to_mode(sheet_with_box(120 + 40 * i, 100, "RGB", "PNG"), mode)
        with open(os.path.join(folder, f"img{i}{'.jpg' if fmt == 'JPEG' else '.' + fmt.lower()}"), "wb") as f:
            f.write(encode(im, fmt))
    open(os.path.join(folder, "empty.png"), "wb").close()
    with open(os.path.join(folder, "text.jpg"), "w") as f:
        f.write("not a picture")
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("skipped: not an image extension")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.module."])
def test_json_reports_broken_files_and_predicts_the_rest(tmp_path, capsys, prefix):
    folder, out, ckpt = str(tmp_path / "imgs"), str(tmp_path / "out"), str(tmp_path / "gpu.pth")
    photo_folder(folder)
    reference = tiny_weights_file(ckpt, prefix)  # keys saved as a DDP / compiled model names them
    assert infer.main(["--images", folder, "--checkpoint", ckpt, "--json", "--no-show", "--output", out]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)  # stdout is the JSON array and nothing else
    assert [os.path.basename(r["file"]) for r in results] == ["empty.png", "img0.png", "img1.jpg", "img2.png",
                                                              "img3.bmp", "text.jpg"]
    broken = {os.path.basename(r["file"]): r for r in results if r["pred"] is None}
    assert set(broken) == {"empty.png", "text.jpg"}
    assert "0 bytes" in broken["empty.png"]["error"] and "not an image" in broken["text.jpg"]["error"]
    good = [r for r in results if r["pred"] is not None]
    batch = np.stack([infer.prepare(infer.open_image(r["file"]), MNIST_INFO) for r in good])
    want = infer.predict(reference, batch, MNIST_INFO, 28, "cpu")  # the saved weights, not a fresh init
    for r, p in zip(good, want):
        assert set(r) >= {"file", "pred", "label", "confidence", "probs"}
        assert r["probs"] == pytest.approx(p.tolist(), abs=1e-5) and sum(r["probs"]) == pytest.approx(1, abs=1e-4)
        assert r["pred"] == int(p.argmax()) and r["label"] == data.DIGITS[r["pred"]]
        assert r["confidence"] == pytest.approx(max(r["probs"]))
    assert sorted(os.listdir(out)) == ["img0.png", "img1.png", "img2.png", "img3.png"]


def test_table_output_and_exit_codes(tmp_path, capsys):
    folder, ckpt = str(tmp_path / "imgs"), str(tmp_path / "w.pth")
    photo_folder(folder)
    tiny_weights_file(ckpt, "module.")
    assert infer.main(["--images", folder, "--checkpoint", ckpt, "--no-show", "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "file" in out and "top-3" in out and "figures: 4" in out
    assert [line.split()[0].endswith("text.jpg") and "error:" in line for line in out.splitlines()].count(True) == 1
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "a.png").write_bytes(b"")
    assert infer.main(["--images", str(only_broken), "--checkpoint", ckpt, "--no-show", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["pred"] is None and "none of the 1 file(s)" in captured.err
    assert infer.main(["--images", str(tmp_path / "nope"), "--checkpoint", ckpt, "--no-show"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert infer.main(["--images", folder, "--checkpoint", str(tmp_path / "empty_dir_ckpt"), "--no-show"]) == 2
    (tmp_path / "ckdir").mkdir()
    assert infer.main(["--images", folder, "--checkpoint", str(tmp_path / "ckdir"), "--no-show"]) == 2
    assert "no *_final.pth in" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "bare.pth")
    assert infer.main(["--images", folder, "--checkpoint", str(tmp_path / "bare.pth"), "--no-show"]) == 1
    assert "model_args" in capsys.readouterr().err
