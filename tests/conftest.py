"""Shared test helpers: small data sets in the real on-disk formats (IDX, CIFAR pickle batches)
written to tmp dirs, so every test runs the real loading code and nothing touches the network; a
tiny model; the readers of a run's outputs; and a CLI runner.

Tiers: `pytest -m "not slow"` is the fast tier (config, model, data parsing, checkpoints, infer);
tests that train or start processes are marked slow and run in CI too."""
import gzip
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TIMING_KEYS = {"epoch_time_s", "images_per_s", "eval_time_s"}
# a ViT small enough for unit tests: 28x28 digits, 16 patches, 2 blocks of width 32
TINY_VIT = {"name": "vit", "image_size": 28, "patch_size": 7, "in_channels": 1, "num_classes": 10, "dim": 32,
            "depth": 2, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0, "drop_path": 0.0, "pool": "cls", "stem": "patch"}
MNIST_INFO = {"dataset": "mnist", "classes": [str(i) for i in range(10)], "mean": [0.1307], "std": [0.3081],
              "in_channels": 1, "digit_style": True, "native_size": 28}


def synthetic_digits(n, seed, size=28, channels=None):
    """Learnable 'digits': class k is a bright 6x6 block at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, size, size)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = 3 + 6 * (k // 4), 3 + 6 * (k % 4)
        images[i, r:r + 6, c:c + 6] = 255
    if channels:
        images = np.repeat(images[:, None], channels, axis=1)
    return images, labels


def idx_bytes(array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(raw_dir, n_train=640, n_test=200, gz=True, seed=0):
    os.makedirs(raw_dir, exist_ok=True)
    tx, ty = synthetic_digits(n_train, seed)
    vx, vy = synthetic_digits(n_test, seed + 1)
    for name, arr in (("train-images-idx3-ubyte", tx), ("train-labels-idx1-ubyte", ty),
                      ("t10k-images-idx3-ubyte", vx), ("t10k-labels-idx1-ubyte", vy)):
        data = idx_bytes(arr)
        if gz:
            with open(os.path.join(raw_dir, name + ".gz"), "wb") as f:
                f.write(gzip.compress(data, mtime=0))
        else:
            with open(os.path.join(raw_dir, name), "wb") as f:
                f.write(data)
    return tx, ty, vx, vy


def write_cifar_set(folder, per_batch=64, n_test=100, seed=0):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        x, y = synthetic_digits(n, seed + i, size=32, channels=3)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": x.reshape(n, -1), b"labels": [int(v) for v in y]}, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f, protocol=2)


@pytest.fixture
def mnist_root(tmp_path):
    root = tmp_path / "data"
    write_idx_set(str(root / "MNIST" / "raw"))
    return str(root)


def run_cli(args, cwd=ROOT, timeout=600, env=None):
    """Run a script of the toolkit as a user would; returns CompletedProcess with text output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


RUN = "t"  # the run name small_run_args gives: outputs in <tmp>/ckpt/t and <tmp>/logs/t


def small_run_args(tmp_path, data_root, *extra):
    """Overrides for a quick CPU run on a synthetic set, with outputs in tmp_path/{ckpt,logs}/t."""
    return [f"data.data_root={data_root}", f"checkpoint.dir={tmp_path}/ckpt", f"log.dir={tmp_path}/logs",
            f"run.name={RUN}", "train.device=cpu", "train.batch_size=32", "model.dim=32", "model.depth=2",
            "model.heads=2", "log.tensorboard=false", "train.eval_batch_size=64", *extra]


# ------------------------------------------------------------------------------- a run's outputs

def read_metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(records):
    """metrics.jsonl lines without the timings, which differ from run to run."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def final_weights(ckpt_dir, name="mnist_transformer_final.pth"):
    from checkpoint import load_checkpoint
    return load_checkpoint(os.path.join(ckpt_dir, name))["model"]


def tiny_weights_file(path, prefix="", model_args=None):
    """A self-describing weights file as train.py writes it; `prefix` mimics DDP / torch.compile.
    Returns the model in eval mode."""
    import torch
    from checkpoint import save_checkpoint
    from model import build_model
    model_args = dict(model_args or TINY_VIT)
    torch.manual_seed(0)
    model = build_model(model_args)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    save_checkpoint(path, {"format": 1, "model": state, "model_args": model_args, "data_info": dict(MNIST_INFO),
                           "config": {}, "epoch": 1, "history": []})
    return model.eval()
