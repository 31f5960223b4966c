"""infer.py on photo-like images, broken files, --json and GPU-style checkpoints; and the issue-3
data paths: folder data sets through train.main, re-gzipped Fashion-MNIST offline, CIFAR files."""
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import infer
import train
from conftest import ROOT, small_run_args, write_cifar_set, write_idx_set
from model import build_model
from photos import STYLES, encode, fine_pen, mnist_test_digits, paper_photo, to_mode
from checkpoint import load_checkpoint, save_checkpoint

MNIST_INFO = {"dataset": "mnist", "classes": data.DIGITS, "mean": [0.1307], "std": [0.3081], "in_channels": 1,
              "digit_style": True, "native_size": 28}
TINY = {"name": "vit", "image_size": 28, "patch_size": 7, "in_channels": 1, "num_classes": 10, "dim": 32, "depth": 2,
        "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0, "drop_path": 0.0, "pool": "cls"}
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


def tiny_checkpoint(path, prefix=""):
    """A self-describing weights file as train.py writes it; `prefix` mimics DDP / torch.compile."""
    torch.manual_seed(0)
    model = build_model(TINY)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    save_checkpoint(path, {"format": 1, "model": state, "model_args": dict(TINY), "data_info": dict(MNIST_INFO),
                           "config": {}, "epoch": 1, "history": []})
    return model.eval()


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
    reference = tiny_checkpoint(ckpt, prefix)  # keys saved as a DDP / compiled model names them
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
    tiny_checkpoint(ckpt, "module.")
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


# ---------------------------------------------------------------------------- data from files

def colour_folder(root, n_train=24, n_test=6):
    """red and blue squares with noise, of several sizes: an ImageFolder tree."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls, rgb in (("blue", (30, 40, 200)), ("red", (210, 30, 30))):
            os.makedirs(os.path.join(root, split, cls))
            for i in range(n):
                a = np.clip(np.array(rgb) + rng.normal(0, 25, (20 + i % 5, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(os.path.join(root, split, cls, f"{i}.{'png' if i % 2 else 'jpg'}"))


@pytest.mark.slow
def test_folder_dataset_trains_evaluates_and_predicts(tmp_path, capsys):
    root = str(tmp_path / "photos")
    colour_folder(root)
    args = small_run_args(tmp_path, root, "data.dataset=folder", "model.image_size=16", "model.patch_size=4",
                          "train.batch_size=8", "train.epochs=3", "data.test_limit=0")
    assert train.main(args) == 0
    ckpt = str(tmp_path / "ckpt" / "folder_transformer_final.pth")
    saved = load_checkpoint(ckpt)
    assert saved["data_info"]["classes"] == ["blue", "red"] and saved["model_args"]["in_channels"] == 3
    history = saved["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_acc"] == 1.0
    capsys.readouterr()
    assert train.main(["--eval", "--checkpoint", ckpt] + args) == 0
    out = capsys.readouterr().out
    assert "Total Samples: 12" in out and "Global Accuracy: 100.00%" in out and "blue: 100.00% of 6" in out
    assert os.path.exists(tmp_path / "ckpt" / "folder_transformer_final_confusion.png")
    probe = tmp_path / "probe.png"
    Image.new("RGBA", (50, 30), (220, 20, 20, 255)).save(probe)
    assert infer.main(["--images", str(probe), "--checkpoint", ckpt, "--json", "--no-show",
                       "--output", str(tmp_path / "o")]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert result["label"] == "red" and len(result["probs"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MNIST, reason="shipped MNIST not present")
def test_regzipped_real_format_fashion_trains_offline(tmp_path, monkeypatch):
    """Real IDX files, re-gzipped (other checksums than upstream), in FashionMNIST/raw: trained
    with no download attempted."""
    src = os.path.join(ROOT, "data", "MNIST", "raw")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):  # the small t10k files stand in for both splits
        for kind in ("images-idx3", "labels-idx1"):
            blob = gzip.decompress(open(os.path.join(src, f"t10k-{kind}-ubyte.gz"), "rb").read())
            packed = gzip.compress(blob, compresslevel=1, mtime=1)
            assert hashlib.md5(packed).digest() != hashlib.md5(open(os.path.join(src, f"t10k-{kind}-ubyte.gz"), "rb").read()).digest()
            (raw / f"{split}-{kind}-ubyte.gz").write_bytes(packed)

    def no_network(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(data, "_try_download", no_network)
    args = small_run_args(tmp_path, str(tmp_path), "data.dataset=fashion_mnist", "data.train_limit=320",
                          "data.test_limit=100", "train.epochs=1")
    assert train.main(args) == 0
    saved = load_checkpoint(str(tmp_path / "ckpt" / "fashion_mnist_transformer_final.pth"))
    assert saved["data_info"]["classes"] == data.FASHION and len(saved["history"]) == 1


def test_truncated_gzip_idx_names_the_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx_set(str(raw))
    p = raw / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz.*(corrupt|truncated)"):
        data.load_raw("mnist", str(tmp_path), download=False)


def test_cifar_count_mismatch_and_missing_batch_name_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_set(str(folder))
    with open(folder / "data_batch_2", "rb") as f:
        d = pickle.load(f)
    d[b"labels"] = d[b"labels"][:-1]
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(d, f, protocol=2)
    with pytest.raises(data.DataError, match="data_batch_2.*64 images but 63 labels"):
        data.load_raw("cifar10", str(tmp_path), download=False)
    (folder / "data_batch_2").unlink()
    with pytest.raises(data.DataError, match="missing data_batch_2"):
        data.load_raw("cifar10", str(tmp_path), download=False)


def test_cifar_from_the_original_archive(tmp_path):
    staging = tmp_path / "staging"
    write_cifar_set(str(staging / "cifar-10-batches-py"))
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    shutil.rmtree(staging)
    tx, ty, vx, vy, info = data.load_raw("cifar10", str(root), download=False)
    assert tx.shape == (320, 3, 32, 32) and vx.shape == (100, 3, 32, 32) and info.classes == data.CIFAR10
