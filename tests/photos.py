"""Paper-photo look-alikes of MNIST digits: dark ink on light, uneven paper, any size, off-centre,
in modes L/RGB/RGBA/P, saved as PNG/JPEG/BMP. The tests use them, and they made test_digit/.

    python tests/photos.py test_digit --small --plain 2   # the shipped samples (10 files)
    python tests/photos.py DIR --count 60 --broken     # a measurement set from MNIST test digits
    python tests/photos.py DIR --count 300 --fine-pen 560   # digits drawn with a fine pen

File names start with the true label (`7_...`), so accuracy can be read off the output.
"""
import argparse
import io
import os
import sys

import numpy as np
from PIL import Image, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (mode, format): every mode in a format that can hold it
STYLES = [("L", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "BMP"), ("L", "JPEG"),
          ("P", "BMP"), ("RGB", "PNG"), ("L", "BMP"), ("RGBA", "PNG")]
# test_digit/: formats that stay a few KB (uncompressed BMP only in L and P)
SHIP_STYLES = [("L", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("L", "BMP"), ("RGB", "JPEG"),
               ("P", "BMP"), ("L", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG")]
EXT = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp"}


def mnist_test_digits(data_root=None):
    """The real MNIST test split: (N, 28, 28) uint8 white-on-black, (N,) labels."""
    data_root = data_root or os.path.join(ROOT, "data")
    sys.path.insert(0, ROOT)
    from data import load_raw
    _, _, vx, vy, _ = load_raw("mnist", data_root, download=False)
    return vx[:, 0].numpy(), vy.numpy()


def paper_photo(digit, rng, height=None, canvas=None, blur=None, noise=None, transparent=False, min_height=60,
                max_height=240):
    """A 28x28 white-on-black digit as dark ink on a lit sheet of paper.

    The digit is scaled up to `height` px and put at a random place on a `canvas` (w, h) of
    paper with a brightness gradient, a tint, sensor noise and an optional blur."""
    height = height or int(rng.integers(min_height, max(min_height + 1, max_height)))
    up = Image.fromarray(digit).resize((height, height), Image.BICUBIC)
    ink = np.asarray(up, dtype=np.float32) / 255.0  # (h, h) ink coverage in [0, 1]
    if canvas is None:
        canvas = (int(height * rng.uniform(1.1, 2.0)), int(height * rng.uniform(1.05, 1.6)))
    W, H = canvas
    y0, x0 = int(rng.integers(0, H - height + 1)), int(rng.integers(0, W - height + 1))
    cover = np.zeros((H, W), np.float32)
    cover[y0:y0 + height, x0:x0 + height] = ink
    paper = rng.uniform(185, 245) + np.linspace(-25, 10, W)[None, :] * rng.uniform(0.3, 1.0)  # light falls off
    paper = paper + np.linspace(-10, 10, H)[:, None] * rng.uniform(-1, 1)
    tint = np.array([1.0, rng.uniform(0.95, 1.0), rng.uniform(0.85, 1.0)], np.float32)  # warm paper
    pen = np.array([rng.uniform(10, 60), rng.uniform(10, 60), rng.uniform(30, 110)], np.float32)  # dark blue-black
    rgb = paper[..., None] * tint * (1 - cover[..., None]) + pen * cover[..., None]
    rgb = rgb + rng.normal(0, rng.uniform(2, 10) if noise is None else noise, rgb.shape)
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    radius = rng.uniform(0, 1.5) if blur is None else blur
    if radius > 0:
        im = im.filter(ImageFilter.GaussianBlur(radius * height / 100))
    if transparent:  # a "scan" with a transparent sheet: only the ink is opaque
        alpha = Image.fromarray(np.clip(cover * 255 * 1.5, 0, 255).astype(np.uint8))
        im = Image.merge("RGBA", (*Image.new("RGB", im.size, tuple(int(v) for v in pen)).split(), alpha))
    return im


def fine_pen(digit, side):
    """The digit as if written with a fine pen on a `side` px sheet: upscaled, only the core of the
    stroke kept (a pen of about side/45 px), dark ink on white."""
    big = Image.fromarray(digit).resize((side, side), Image.BICUBIC)
    return Image.fromarray(255 - np.asarray(big.point(lambda v: 255 if v > 250 else 0), dtype=np.uint8))


def to_mode(im, mode):
    if mode == "P":
        return im.convert("RGB").quantize(64)
    if mode == "RGBA" and im.mode != "RGBA":
        return im.convert("RGBA")
    return im.convert(mode) if im.mode != mode else im


def encode(im, fmt):
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_set(out, digits, labels, indices, seed, plain=0, broken=False, small=False, pen_side=0):
    """Photos of digits[indices] in the cycling STYLES; the first `plain` stay MNIST-like (28x28
    white on black). `small`: 40..64 px digits with little noise, so each file is a few KB.
    `pen_side`: fine-pen drawings on a sheet of that size instead (grey PNG).
    Returns the list of (path, label)."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    written = []
    for n, i in enumerate(indices):
        styles = SHIP_STYLES if small else STYLES
        mode, fmt = styles[n % len(styles)]
        label = int(labels[i])
        if n < plain:
            im, tag = Image.fromarray(digits[i]), "mnist"
        elif pen_side:
            im, tag, fmt = fine_pen(digits[i], pen_side), "finepen", "PNG"
        else:
            look = {"min_height": 40, "max_height": 64, "noise": rng.uniform(1, 3)} if small else {}
            im = paper_photo(digits[i], rng, transparent=mode == "RGBA" and n % 4 == 2, **look)
            im, tag = to_mode(im, mode), f"photo_{mode.lower()}"
        path = os.path.join(out, f"{label}_{tag}_{i:04d}{EXT[fmt]}")
        with open(path, "wb") as f:
            f.write(encode(im, fmt))
        written.append((path, label))
    if broken:
        open(os.path.join(out, "broken_empty.png"), "wb").close()
        with open(os.path.join(out, "broken_text.jpg"), "w") as f:
            f.write("this is not a picture\n")
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description="Write paper-photo look-alikes of real MNIST test digits.")
    p.add_argument("out", help="folder to write into")
    p.add_argument("--count", type=int, default=10, help="number of images (default: 10)")
    p.add_argument("--seed", type=int, default=3, help="picks the digits and the looks (default: 3)")
    p.add_argument("--plain", type=int, default=0, help="how many stay plain 28x28 MNIST images (default: 0)")
    p.add_argument("--broken", action="store_true", help="add a zero-byte .png and a text file named .jpg")
    p.add_argument("--small", action="store_true", help="40..64 px digits, little noise: a few KB a file")
    p.add_argument("--fine-pen", type=int, default=0, metavar="SIDE",
                   help="draw each digit with a fine pen on a SIDE px sheet instead (e.g. 560)")
    args = p.parse_args(argv)
    digits, labels = mnist_test_digits()
    rng = np.random.default_rng(args.seed)
    per_class = -(-args.count // 10)
    indices = np.concatenate([rng.choice(np.flatnonzero(labels == k), per_class, replace=False) for k in range(10)])
    indices = rng.permutation(indices)[:args.count]
    for path, _ in write_set(args.out, digits, labels, indices, args.seed, args.plain, args.broken,
                                 args.small, args.fine_pen):
        print(f"{path}  ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
