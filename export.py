"""Export a trained model for programs outside this toolkit, and check the export against PyTorch.

    python export.py --checkpoint checkpoints --output exports/mnist_onnx     (the newest run's final weights)
    python export.py --checkpoint PATH --format pt2|safetensors --output DIR [--check-images N] [--data-root DIR]

Writes DIR/model.onnx (run with onnxruntime), DIR/model.pt2 (torch.export.load) or DIR/model.safetensors
(the weights infer.py uses: EMA when the run kept them), and DIR/model.json with what another
program needs: model keys, classes, the input and output tensors and the preprocessing that turns
an image into the input. The ONNX and .pt2 graphs take the normalised float input (B, C, S, S) for
any batch size B and return logits.

The export is then loaded back and compared with the PyTorch model on up to N test images of the
checkpoint's data set (random inputs when the data set is not on disk, and the output says so).
A difference over the tolerance or any changed prediction exits 1 and writes no model.json, so a
bad export cannot be taken for a good one. infer.py and `train.py --eval` read a safetensors export
as they read a checkpoint.

ONNX goes through torch.onnx.export(dynamo=True): the torch.export-based exporter, the default
since torch 2.9 (the TorchScript exporter, dynamo=False, is deprecated). It needs onnxscript.
"""
import os

# Before torch loads OpenMP: an idle OpenMP thread spins for a short while, then sleeps, so a run that
# shares its cores with other work (another run) slows down in proportion, not several-fold (docs/bench.md).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import argparse
import importlib
import json
import warnings

import torch

from checkpoint import EXPORT_META, load_trained
from data import DataError, load_folder_split, load_raw, normalize
from infer import PEN, find_checkpoint
from model import build_model
from utils import (UserError, atomic_write_bytes, exit_with, load_config, read_safetensors, user_errors,
                   write_safetensors)

FILES = {"onnx": "model.onnx", "pt2": "model.pt2", "safetensors": "model.safetensors"}
# the packages a format needs beyond requirements.txt
NEEDS = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "pt2": (), "safetensors": ()}
OPSET = 18  # onnxruntime >= 1.14 runs it; attention becomes MatMul + Softmax, LayerNorm one op (opset 17+)
INPUT, OUTPUT = "input", "logits"
TOLERANCE = 1e-4  # max |logit difference| allowed in fp32
CHECK_BATCH = 256  # the check runs in batches of this size, so a batch other than the traced one is used
SEED = 0  # random inputs when no test images are on disk


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 like every other user error, not argparse's usage block
        raise UserError(f"{message}; see python export.py --help", code=2)


def parse_args(argv=None):
    p = Parser(description="Export a trained checkpoint to ONNX, torch.export (.pt2) or safetensors, "
                           "with model.json, and check it against the PyTorch model.")
    p.add_argument("--checkpoint", required=True,
                   help="weights file written by train.py (or a folder: its newest *_final.pth)")
    p.add_argument("--format", default="onnx", choices=tuple(FILES), help="what to write (default: onnx)")
    p.add_argument("--output", required=True, help="folder for the model file and model.json")
    p.add_argument("--check-images", type=int, default=1000,
                   help="compare with PyTorch on up to N test images (default: 1000)")
    p.add_argument("--data-root", default=None,
                   help="where the data sets live (default: data.data_root of config.yaml)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest |logit difference| that passes (default: {TOLERANCE:g})")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, 14 or newer (default: {OPSET})")
    args = p.parse_args(argv)
    if args.check_images < 1:
        raise UserError(f"--check-images {args.check_images} must be >= 1")
    if not args.tolerance > 0:
        raise UserError(f"--tolerance {args.tolerance} must be > 0")
    if args.opset < 14:
        raise UserError(f"--opset {args.opset}: scaled_dot_product_attention needs opset 14 or newer; e.g. --opset 18")
    return args


def require(fmt):
    """Import the optional packages `fmt` needs; a missing one is a one-line error with the pip command."""
    needed = NEEDS[fmt]
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"--format {fmt} needs {' and '.join(needed[:2])}; pip install {' '.join(needed)} "
                            f"({name} is missing)", code=1) from None


# ---------------------------------------------------------------------------------- exporters

def first_line(error):
    return (str(error).strip().splitlines() or [""])[0][:200]


def batch_dim():
    return ({0: torch.export.Dim("batch")},)  # the one positional input: batch size free


def export_onnx(model, example, path, opset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on decompositions, not errors
        torch.onnx.export(model, (example,), path, input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
                          dynamo=True, external_data=False, dynamic_shapes=batch_dim(), verbose=False)
    import onnx
    onnx.checker.check_model(path)


def export_pt2(model, example, path, opset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=batch_dim())
    torch.export.save(program, path)


def export_safetensors(model, example, path, opset):
    write_safetensors(path, model.state_dict(), {"format": "pt"})  # safetensors.torch writes format=pt too


EXPORTERS = {"onnx": export_onnx, "pt2": export_pt2, "safetensors": export_safetensors}


def write_model(fmt, model, model_args, path, opset):
    """Write the model file; an exporter that cannot handle this model is a one-line error."""
    size = int(model_args["image_size"])
    example = torch.zeros(2, int(model_args["in_channels"]), size, size)  # 2: a size-1 dimension would be fixed at 1
    try:
        EXPORTERS[fmt](model, example, path, opset)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--format {fmt} cannot export model.name={model_args['name']} ({type(e).__name__}: "
                        f"{first_line(e)}); try another --format", code=1) from None


# ------------------------------------------------------------------------------------ runners

def onnx_runner(path, model_args):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # as many threads as the PyTorch side uses
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def pt2_runner(path, model_args):
    return torch.export.load(path).module()


def safetensors_runner(path, model_args):
    model = build_model(model_args)
    model.load_state_dict(read_safetensors(path)[0])
    return model.eval()


RUNNERS = {"onnx": onnx_runner, "pt2": pt2_runner, "safetensors": safetensors_runner}


# -------------------------------------------------------------------------------------- check

def load_test_images(info, data_root):
    """uint8 (N, C, S, S) test images of the checkpoint's data set, at its native size."""
    if info["dataset"] == "folder":
        return load_folder_split(data_root, "test", int(info["native_size"]), 0, list(info["classes"]))[0]
    return load_raw(info["dataset"], data_root, download=False)[2]


def check_inputs(info, image_size, n, data_root):
    """(normalised float inputs (n', C, S, S), what they are in words): the first n test images,
    or n random images when the data set is not on disk."""
    try:
        images, what = load_test_images(info, data_root)[:n], "test images"
    except DataError as e:
        print(f"note: no {info['dataset']} test images under {data_root} ({e}); "
              f"checking on random inputs instead")
        size = int(info["native_size"])
        gen = torch.Generator().manual_seed(SEED)
        images = torch.randint(0, 256, (n, int(info["in_channels"]), size, size), generator=gen, dtype=torch.uint8)
        what = "random inputs"
    return normalize(images, info["mean"], info["std"], image_size), what


@torch.no_grad()
def compare(model, runner, x):
    """(max |logit difference|, images with the same argmax) between the PyTorch model and the export."""
    worst, same = 0.0, 0
    for i in range(0, x.shape[0], CHECK_BATCH):
        xb = x[i:i + CHECK_BATCH]
        try:
            got = runner(xb).float()
        except Exception as e:
            raise UserError(f"the export fails on a batch of {xb.shape[0]} ({type(e).__name__}: {first_line(e)}); "
                            f"try another --format", code=1) from None
        want = model(xb)
        if got.shape != want.shape:
            raise UserError(f"the export returns shape {tuple(got.shape)} for a batch of {xb.shape[0]}, "
                            f"PyTorch {tuple(want.shape)}; the export is broken", code=1)
        worst = max(worst, float((got - want).abs().max()))
        same += int((got.argmax(1) == want.argmax(1)).sum())
    return worst, same


# --------------------------------------------------------------------------------- model.json

RUN = {"onnx": "onnxruntime.InferenceSession('model.onnx').run(['logits'], {'input': x})[0]",
       "pt2": "torch.export.load('model.pt2').module()(x)",
       "safetensors": "this toolkit's model.build_model(model_args), load_state_dict(the weights), eval(), then "
                      "model(x); or python infer.py --checkpoint DIR"}


def image_steps(info):
    """How infer.py's prepare() turns an image file into uint8 (C, native_size, native_size), in words."""
    size = int(info["native_size"])
    if not info.get("digit_style"):
        return [f"convert to RGB and resize to {size}x{size} (PIL bilinear; the aspect ratio is not kept)"]
    fashion = info["dataset"] == "fashion_mnist"
    box = size if fashion else round(size * 20 / 28)
    steps = ["convert to grey 0..255 (transparent pixels become paper)",
             "invert when the border is light (dark ink on light paper), so the object is light on black",
             "take off the paper level and stretch the ink to 0..1",
             "crop to the ink, ignoring specks"]
    if not fashion:
        steps.append(f"widen a pen much finer than MNIST's stroke to {PEN * size / 28:g} px at the output scale")
    steps.append(f"scale the longer side to {box} px of {size} (bilinear), keeping the aspect ratio")
    steps.append(f"paste into a black {size}x{size} canvas, centred on the "
                 + ("box" if fashion else "centre of mass, as MNIST was made"))
    return steps + ["round to uint8 (0..255)"]


def preprocessing(info, image_size):
    return {"summary": "image -> uint8 (C, native_size, native_size) -> /255 -> resize to image_size (bilinear) "
                       "-> (x - mean) / std per channel -> float32 (B, C, image_size, image_size)",
            "native_size": int(info["native_size"]), "digit_style": bool(info.get("digit_style")),
            "image": image_steps(info), "scale": 1 / 255,
            "resize": {"size": [image_size, image_size], "mode": "bilinear", "align_corners": False,
                       "antialias": False, "only_when": "native_size != image_size",
                       "as": "torch.nn.functional.interpolate"},
            "mean": list(info["mean"]), "std": list(info["std"]),
            "reference": "infer.py prepare(), then data.normalize()"}


def tensor_specs(fmt, model_args, classes):
    c, s = int(model_args["in_channels"]), int(model_args["image_size"])
    onnx = fmt == "onnx"
    return ({"name": INPUT if onnx else "x", "shape": ["batch", c, s, s], "dtype": "float32", "layout": "NCHW",
             "image_size": s, "channels": c, "holds": "the normalised images (see preprocessing)"},
            {"name": OUTPUT if onnx else "output", "shape": ["batch", len(classes)], "dtype": "float32",
             "holds": "logits in the order of classes; softmax over axis 1 gives the probabilities"})


def source_of(path, ckpt, kind):
    if "export" in ckpt:  # an export exported again: keep the checkpoint it came from
        return {**ckpt["export"].get("source", {}), "via": os.path.abspath(path)}
    last = (ckpt.get("history") or [{}])[-1]
    return {"checkpoint": os.path.abspath(path), "epoch": ckpt.get("epoch"), "val_acc": last.get("val_acc"),
            "ema_val_acc": last.get("ema_val_acc")}


def describe(args, path, ckpt, kind, check):
    """Everything model.json holds."""
    margs, info = ckpt["model_args"], ckpt["data_info"]
    inp, out = tensor_specs(args.format, margs, info["classes"])
    versions = {"torch": torch.__version__}
    if args.format == "onnx":
        import onnx
        import onnxruntime
        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, opset=args.opset,
                        exporter="torch.onnx.export(dynamo=True)")
    return {"format": args.format, "file": FILES[args.format], "run": RUN[args.format], "weights": kind,
            "model_args": margs, "dataset": info["dataset"], "classes": list(info["classes"]),
            "input": inp, "output": out, "preprocessing": preprocessing(info, int(margs["image_size"])),
            "source": source_of(path, ckpt, kind), "check": check, "exported_with": versions}


# --------------------------------------------------------------------------------------- main

def load_back(fmt, path, model_args):
    try:
        return RUNNERS[fmt](path, model_args)
    except Exception as e:
        raise UserError(f"{path} was written but cannot be loaded back ({type(e).__name__}: {first_line(e)}); "
                        f"try another --format", code=1) from None


def run(args):
    require(args.format)  # before any work: a missing package is found in a second
    path = find_checkpoint(args.checkpoint)
    model, ckpt, kind = load_trained(path)
    model = model.float().eval()  # fp32 on the CPU: the attention takes the SDPA path, which every exporter handles
    margs, info = ckpt["model_args"], ckpt["data_info"]
    print(f"checkpoint: {path} ({info['dataset']}, model.name={margs['name']}, {kind} weights, "
          f"epoch {ckpt.get('epoch')})")
    data_root = args.data_root or load_config().data.data_root
    x, what = check_inputs(info, int(margs["image_size"]), args.check_images, data_root)
    os.makedirs(args.output, exist_ok=True)
    meta_path, out = os.path.join(args.output, EXPORT_META), os.path.join(args.output, FILES[args.format])
    if os.path.isfile(meta_path):
        os.remove(meta_path)  # an older export's description must not outlive a failed export
    write_model(args.format, model, margs, out, args.opset)
    worst, same = compare(model, load_back(args.format, out, margs), x)
    n = x.shape[0]
    print(f"{args.format}: max |dlogit| {worst:.1e} over {n} {what}, same prediction for {same}/{n}")
    if not (worst <= args.tolerance and same == n):
        raise UserError(f"the {args.format} export differs from the PyTorch model (max |dlogit| {worst:.1e}, "
                        f"tolerance {args.tolerance:g}; {n - same} prediction(s) differ); {out} is kept for "
                        f"inspection, without {EXPORT_META}", code=1)
    check = {"inputs": what, "count": n, "max_abs_dlogit": worst, "same_prediction": same,
             "tolerance": args.tolerance}
    atomic_write_bytes(meta_path, (json.dumps(describe(args, path, ckpt, kind, check), indent=2) + "\n").encode())
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.2f} MiB) and {meta_path}")
    return 0


@user_errors
def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    exit_with(main)
