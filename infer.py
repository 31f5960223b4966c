"""Predict your own images with a trained checkpoint: a table (or JSON) and one figure per image.

    python infer.py                                        test_digit/ with the newest final weights
    python infer.py --images photo.jpg --checkpoint checkpoints/RUN   a run's final weights
    python infer.py --images DIR --json --no-show          one JSON array on stdout and nothing else
    python infer.py --checkpoint exports/mnist             a safetensors export (python export.py)
    python infer.py --serve                                a page at http://127.0.0.1:8000/ to draw or drop images

For the MNIST-style sets the pictures are prepared the way MNIST was made, so that a phone photo
or scan of dark ink on paper looks like the training data: grey, inverted when the background is
light, cropped to the ink, a fine pen widened to MNIST's stroke, scaled into a 20x20 box and put
into 28x28 centred on the centre of mass (Fashion-MNIST: a 28 box, centred on the box, nothing
widened). CIFAR-10 and folder models get RGB resized as in training. The model is rebuilt from the
checkpoint alone, or from a safetensors export (python export.py --format safetensors).
"""
import os

# Before torch loads OpenMP: an idle OpenMP thread spins for a short while, then sleeps, so a run that
# shares its cores with other work (another run) slows down in proportion, not several-fold (docs/bench.md).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import argparse
import json
import math
import sys

import numpy as np
import torch

from checkpoint import is_export, load_trained, newest_final
from data import IMAGE_EXTS, eight_bit, image_uint8, normalize
from utils import UserError, ensure_writable, exit_with, load_config, resolve_device, user_errors

MAX_SIDE = 1024  # larger photos are shrunk first: a 28x28 result needs no more, and it bounds the work
PEN = 2.0  # the stroke width a fine pen is widened to, in output pixels (28x28, digit in a 20 px box)
THIN = 0.5  # a pen under THIN * PEN (1.0 px: thinner than 99% of MNIST's strokes, median 1.8) is widened


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Predict the class of image files with a trained ViT checkpoint.")
    p.add_argument("--images", default="test_digit", help="an image file or a folder of them (default: test_digit)")
    p.add_argument("--checkpoint", default=None,
                   help="weights file, a safetensors export folder (export.py), or a folder to take the newest "
                        "*_final.pth from (default: checkpoint.dir of config.yaml)")
    p.add_argument("--output", default="outputs", help="folder for one figure per image (default: outputs)")
    p.add_argument("--no-show", action="store_true",
                   help="do not open a window (default: open one when a display exists)")
    p.add_argument("--json", action="store_true", help="print one JSON array to stdout and nothing else (no window)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                   help="where to run the model (default: auto)")
    p.add_argument("--serve", action="store_true",
                   help="instead of predicting files, serve a local page to draw a digit or drop a photo and see the "
                        "prediction live, and a POST /predict endpoint (docs/serve.md)")
    p.add_argument("--port", default="8000", help="port for --serve (default: 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address --serve listens on (default: 127.0.0.1, this machine only)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- model

def find_checkpoint(given):
    if given and (not os.path.isdir(given) or is_export(given)):
        return given
    folder = given or load_config().checkpoint.dir
    path = newest_final(folder)
    if path is None:
        raise UserError(f"no *_final.pth in {folder}; train first with python train.py, or pass --checkpoint PATH")
    return path


def load_model(path, device):
    """(model in eval mode with the EMA weights when the run kept them, data_info, image size)."""
    model, ckpt, _ = load_trained(path)
    return model.to(device).eval(), ckpt["data_info"], ckpt["model_args"]["image_size"]


# -------------------------------------------------------------------------------------- images

def list_images(path):
    """Image files of a folder (by extension, sorted), or the one file given."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--images {path}: no such file or folder; pass an image or a folder of images")
    files = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(path, n)))
    if not files:
        raise UserError(f"--images {path} holds no images ({', '.join(IMAGE_EXTS)}); add some or pass another folder")
    return files


def open_image(path):
    """The decoded image, upright as the camera meant it. Raises ValueError with a reason a user can act on."""
    with open(path, "rb") as f:
        return read_image(f)


def read_image(f):
    """open_image for an open binary file or io.BytesIO: what `--serve` decodes an upload with."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not f.read(1):
        raise ValueError("empty file (0 bytes)")
    f.seek(0)
    try:
        with Image.open(f) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise ValueError("not an image that Pillow can read (PNG, JPEG, BMP, ...)") from None
    except Exception as e:  # truncated data, decompression bombs, broken headers: all per file
        raise ValueError(f"cannot decode ({type(e).__name__}: {str(e)[:100]})") from None
    if max(im.size) > MAX_SIDE:
        im.thumbnail((MAX_SIDE, MAX_SIDE))
    return im


def flatten_alpha(im):
    """Transparent pixels become paper behind the ink: white behind dark ink, black behind light ink."""
    from PIL import Image

    if im.mode not in ("RGBA", "LA", "PA") and not (im.mode == "P" and "transparency" in im.info):
        return im
    rgba = im.convert("RGBA")
    opaque = np.asarray(rgba.getchannel("A")) > 127
    lum = np.asarray(rgba.convert("L"))
    dark_ink = opaque.any() and lum[opaque].mean() < 128
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if dark_ink else (0, 0, 0, 255))
    return Image.alpha_composite(paper, rgba).convert("RGB")


def to_gray(im):
    """float32 (H, W) in 0..255; 16-bit and float images are scaled to their own range."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float32)
        return (a - a.min()) * (255.0 / max(float(a.max() - a.min()), 1e-6))
    return np.asarray(flatten_alpha(im).convert("L"), dtype=np.float32)


def border(a):
    k = max(1, round(0.05 * min(a.shape)))
    return np.concatenate([a[:k].ravel(), a[-k:].ravel(), a[:, :k].ravel(), a[:, -k:].ravel()])


def otsu(a):
    """The grey level that best splits a 0..255 image into two classes (background and ink)."""
    hist = np.bincount(np.clip(a, 0, 255).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * np.arange(256))
    w1 = w0[-1] - w0
    between = (m0[-1] * w0 - m0 * w0[-1]) ** 2 / np.maximum(w0 * w1, 1e-9)  # scaled between-class variance
    return int(np.argmax(between[:-1]))


def ink_map(gray):
    """Bright ink on a black background, in [0, 1]: inverted when the background is light, then
    the paper level (with its noise and uneven light) taken off and the ink stretched to 1."""
    if np.median(border(gray)) > 127.5:  # the sheet is light: the ink is dark
        gray = 255.0 - gray
    edge = border(gray)
    bg = float(np.median(edge))
    t = otsu(gray)
    above = gray[gray > t]
    hi = float(np.percentile(above, 90)) if above.size else bg
    if hi - bg < 10:  # no ink to speak of: a blank page
        return np.zeros_like(gray)
    lo = min(max(float(np.percentile(edge, 98)), bg + 0.1 * (hi - bg)), bg + 0.5 * (hi - bg))
    return np.clip((gray - lo) / (hi - lo), 0.0, 1.0)


def ink_box(ink):
    """(top, bottom, left, right) of the ink, end-exclusive, ignoring specks; None if there is none."""
    from PIL import Image, ImageFilter

    mask = ink > 0.2
    if min(mask.shape) >= 56:  # large images: a 3x3 median drops isolated noise pixels
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(3))) > 0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def pen_width(mask):
    """The stroke width of a boolean ink mask in pixels: 2 * area / boundary length (a stroke of
    width w and length L has area w*L and a boundary of about 2*L)."""
    edges = np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1])
    return 2.0 * np.count_nonzero(mask) / max(edges, 1)


def widen(ink, px):
    """Grey dilation of the ink by a px x px square (px odd), so a thin pen survives the shrink."""
    t = torch.from_numpy(np.ascontiguousarray(ink, dtype=np.float32))[None, None]
    return torch.nn.functional.max_pool2d(t, px, stride=1, padding=px // 2)[0, 0].numpy()


def resize_float(a, w, h):
    from PIL import Image
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((w, h), Image.BILINEAR))


def mnist_style(im, size=28, box=20, by_mass=True, pen=PEN):
    """uint8 (size, size), white ink on black, as MNIST was made: crop to the ink with a margin,
    widen a pen much finer than `pen` output px to `pen` (None: never), scale the longer side to
    `box` px keeping the aspect ratio, then centre on the centre of mass (by_mass) or on the box."""
    ink = ink_map(to_gray(im))
    found = ink_box(ink)
    out = np.zeros((size, size), np.float32)
    if found is None:
        return out.astype(np.uint8)
    top, bottom, left, right = found
    scale = box / max(bottom - top, right - left)
    m = math.ceil(2 / scale)  # two output pixels of margin keep the blurred stroke edges
    crop = np.pad(ink, m)[top:bottom + 2 * m, left:right + 2 * m]
    if pen:  # else a fine pen on a large photo shrinks to a faint hair
        width = pen_width(crop > 0.5)  # in photo pixels
        grow = round(pen / scale - width)
        if width * scale < THIN * pen and grow >= 2:
            crop = widen(crop, grow + 1 - grow % 2)  # odd: the stroke grows evenly
    small = resize_float(crop, max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    small = np.clip(small, 0, 1)
    h, w = small.shape
    if by_mass and small.sum() > 0:
        ys, xs = np.indices(small.shape)
        cy, cx = (small * ys).sum() / small.sum(), (small * xs).sum() / small.sum()
        dy, dx = round(size / 2 - cy), round(size / 2 - cx)  # MNIST's centres of mass sit at 14.0
    else:
        dy, dx = round((size - h) / 2), round((size - w) / 2)
    # paste `small` at (dy, dx), clipped to the canvas
    y0, x0, y1, x1 = max(dy, 0), max(dx, 0), min(dy + h, size), min(dx + w, size)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = small[y0 - dy:y1 - dy, x0 - dx:x1 - dx]
    return np.round(out * 255).astype(np.uint8)


def prepare(im, info):
    """uint8 (C, S, S) at the data's native size, ready for data.normalize."""
    size = int(info["native_size"])
    if info.get("digit_style"):
        fashion = info.get("dataset") == "fashion_mnist"  # its items fill a 28 box, centred on the box
        return mnist_style(im, size, size if fashion else round(size * 20 / 28), by_mass=not fashion,
                           pen=None if fashion else PEN * size / 28)[None]
    return image_uint8(im, size, int(info.get("in_channels", 3)))


# ------------------------------------------------------------------------------------ predict

@torch.no_grad()
def predict(model, batch, info, image_size, device):
    """(B, K) class probabilities for a uint8 (B, C, S, S) batch, in one forward pass."""
    x = normalize(torch.from_numpy(batch).to(device), info["mean"], info["std"], image_size)
    return torch.softmax(model(x).float(), dim=1).cpu()


def printable(path):
    """A file name as text that can be printed and drawn: bytes that are not UTF-8 become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def figure_names(files):
    """One figure name per file, never two alike: the extension joins the name where two files
    share a stem, and a number where that still collides (a.png, a.jpg and a_png.png)."""
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    names, used = [], set()
    for stem, f in zip(stems, files):
        name = f"{stem}_{os.path.splitext(f)[1][1:].lower()}" if stems.count(stem) > 1 else stem
        unique, n = name, 1
        while unique in used:
            n += 1
            unique = f"{name}_{n}"
        used.add(unique)
        names.append(unique + ".png")
    return names


def save_figure(path, views, probs, classes, title, keep_open):
    """The original, the model's view of it (views = (PIL image, uint8 (C, S, S))), and the class
    probabilities with the prediction in red."""
    import matplotlib.pyplot as plt

    original, seen = views
    pred = int(probs.argmax())
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.8]})
    ax[0].imshow(np.asarray(eight_bit(flatten_alpha(original)).convert("RGB")))
    ax[0].set_title(f"original {original.size[0]}x{original.size[1]} {original.mode}", fontsize=9)
    if seen.shape[0] == 1:
        ax[1].imshow(seen[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax[1].imshow(seen.transpose(1, 2, 0))
    ax[1].set_title(f"model input {seen.shape[2]}x{seen.shape[1]}", fontsize=9)
    for a in ax[:2]:
        a.set_xticks([])
        a.set_yticks([])
    colours = ["tab:red" if k == pred else "tab:gray" for k in range(len(classes))]
    ax[2].bar(range(len(classes)), probs.numpy(), color=colours)
    ax[2].set_xticks(range(len(classes)), classes, rotation=0 if max(map(len, classes)) <= 2 else 45,
                     ha="center" if max(map(len, classes)) <= 2 else "right", fontsize=8)
    ax[2].set_ylim(0, 1)
    ax[2].set_ylabel("probability")
    ax[2].set_title(f"{classes[pred]}  ({100 * float(probs[pred]):.1f}%)", color="tab:red")
    fig.suptitle(printable(title), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    if not keep_open:
        plt.close(fig)


def display_available():
    if sys.platform.startswith("linux") or "bsd" in sys.platform:
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True  # macOS and Windows sessions have a screen


def choose_backend(show):
    """True if windows can open; otherwise matplotlib draws to files only (Agg)."""
    import matplotlib
    if show:
        try:
            import matplotlib.pyplot as plt
            plt.close(plt.figure())  # a DISPLAY that no server answers fails here, not mid-run
            if matplotlib.get_backend().lower() != "agg":
                return True
        except Exception:
            pass
    matplotlib.use("Agg", force=True)
    return False


def print_table(results):
    width = max(len(printable(r["file"])) for r in results)
    print(f"{'file':<{width}}  {'class':<12} {'conf':>6}  top-3")
    for r in results:
        name = printable(r["file"])
        if r["pred"] is None:
            print(f"{name:<{width}}  {'-':<12} {'-':>6}  error: {r['error']}")
        else:
            top = " | ".join(f"{label} {100 * p:.1f}%" for label, p in r["top3"])
            print(f"{name:<{width}}  {r['label']:<12} {100 * r['confidence']:5.1f}%  {top}")


def error_row(path, reason):
    return {"file": path, "pred": None, "label": None, "confidence": None, "probs": None, "error": reason}


def prediction_row(path, p, classes, figure):
    top = p.topk(min(3, len(classes)))
    return {"file": path, "pred": int(top.indices[0]), "label": classes[int(top.indices[0])],
            "confidence": round(float(top.values[0]), 6), "probs": [round(float(v), 6) for v in p],
            "top3": [[classes[int(k)], round(float(v), 6)] for v, k in zip(top.values, top.indices)], "figure": figure}


def predict_files(files, loaded, device, output, show):
    """One row per file, in the order given: unreadable files get an error, the rest go through
    the model (loaded = load_model's (model, data_info, image_size)) as one batch and get a figure each."""
    model, info, image_size = loaded
    rows, opened = {}, {}
    for f in files:
        try:
            opened[f] = open_image(f)
        except (ValueError, OSError) as e:
            rows[f] = error_row(f, str(e))
    good = list(opened)
    if good:
        batch = np.stack([prepare(opened[f], info) for f in good])  # (B, C, S, S) uint8
        probs = predict(model, batch, info, image_size, device)
        classes = list(info["classes"])
        for i, (f, name) in enumerate(zip(good, figure_names(good))):
            figure = os.path.join(output, name)
            keep_open = show and i < 12  # a window per figure, up to a dozen
            save_figure(figure, (opened[f], batch[i]), probs[i], classes, os.path.basename(f), keep_open)
            rows[f] = prediction_row(f, probs[i], classes, figure)
    return [rows[f] for f in files]


def run(args):
    if args.serve:
        import serve  # the server and its page load only when asked for
        return serve.run(args)
    show = choose_backend(not args.no_show and not args.json and display_available())
    files = list_images(args.images)
    ensure_writable(args.output, "--output")  # before any work: the figures go there
    path = find_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    loaded = load_model(path, device)
    info = loaded[1]
    results = predict_files(files, loaded, device, args.output, show)
    n_good = sum(r["pred"] is not None for r in results)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"checkpoint: {path} ({info['dataset']}, {len(info['classes'])} classes) on {device}")
        print_table(results)
        if n_good:
            print(f"figures: {n_good} in {args.output}/")
    if not n_good:
        raise UserError(f"none of the {len(files)} file(s) in {args.images} could be read as an image", code=1)
    if show:
        import warnings
        import matplotlib.pyplot as plt
        with warnings.catch_warnings():  # a display without a GUI toolkit: the figures are saved anyway
            warnings.simplefilter("ignore", UserWarning)
            plt.show()
    return 0


@user_errors
def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    exit_with(main)
