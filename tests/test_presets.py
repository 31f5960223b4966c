"""Every preset in configs/ loads, states its status, trains on a small set in its dataset's real
on-disk format, and repeats itself exactly with the same seed."""
import glob
import json
import os

import pytest

import train
from conftest import ROOT, write_cifar_set, write_idx_set
from utils import load_config

PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
TIMING_KEYS = {"epoch_time_s", "images_per_s", "eval_time_s"}


def test_there_are_presets_for_every_dataset_and_model():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"mnist.yaml", "fashion_mnist.yaml", "cifar10_vit.yaml", "cifar10_resnet.yaml", "mnist_fast.yaml",
            "folder_small.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_loads_and_states_its_accuracy_status(path):
    cfg = load_config(path, [])
    with open(path) as f:
        head = f.read().split("\n\n")[0]
    assert "python train.py --config configs/" in head
    assert "Measured" in head or "NOT MEASURED" in head or "NOT been measured" in head  # never silent
    assert cfg.train.seed == 42


def synthetic_root(tmp_path, dataset):
    root = tmp_path / "data"
    if dataset == "cifar10":
        write_cifar_set(str(root / "cifar-10-batches-py"), per_batch=16, n_test=40)
    elif dataset == "folder":
        from test_finetune import grey_folder
        grey_folder(str(root), classes=3, per_class=20)
    else:
        write_idx_set(str(root / ("MNIST" if dataset == "mnist" else "FashionMNIST") / "raw"), n_train=80, n_test=40)
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_trains_and_repeats_exactly_with_its_seed(path, tmp_path):
    dataset = load_config(path, []).data.dataset
    root = synthetic_root(tmp_path, dataset)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = ["--config", path, f"data.data_root={root}", f"checkpoint.dir={out}/ckpt", f"log.dir={out}/logs",
                "run.name=p", "train.device=cpu", "train.compile=false", "train.epochs=1", "train.min_steps=0",
                "train.batch_size=16", "data.train_limit=48", "log.tensorboard=false", "train.eval_batch_size=40"]
        assert train.main(args) == 0
        with open(out / "logs" / "p" / "metrics.jsonl") as f:
            runs.append([{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f])
    assert [r["epoch"] for r in runs[0]] == [1]
    assert runs[0] == runs[1]
    assert all(r["train_loss"] == r["train_loss"] for r in runs[0])  # no NaN
