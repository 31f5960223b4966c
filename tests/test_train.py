import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

import train
from checkpoint import find_resume_checkpoint, load_checkpoint
from conftest import ROOT, RUN, TINY_VIT, comparable, final_weights, read_metrics, small_run_args, write_idx_set
from model import build_model
from utils import UserError, load_config, setup_logging


class StopAfter(train.StopSignal):
    """Acts as if SIGTERM arrived just before the n-th stop check (one per step, one per epoch end)."""
    n = 0

    def __init__(self):
        super().__init__()
        self.calls = 0

    def agreed(self, device, world):
        self.calls += 1
        return self.calls >= self.n


# ------------------------------------------------------------------------------------- unit pieces

def sched_cfg(**kw):
    base = dict(scheduler="cosine", warmup_epochs=1, min_lr_ratio=0.0, step_epochs=2, gamma=0.1,
                restart_epochs=2, restart_mult=1)
    base.update(kw)
    return OmegaConf.create(base)


def test_lr_schedule_warmup_then_cosine():
    c = sched_cfg()
    f = [train.lr_factor(s, 100, 10, c) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then monotone decay
    assert f[55] == pytest.approx(0.5, abs=0.02) and f[99] < 0.01


def test_lr_schedule_step_restarts_none():
    step = [train.lr_factor(s, 100, 10, sched_cfg(scheduler="step", warmup_epochs=0)) for s in (0, 19, 20, 40)]
    assert step == pytest.approx([1.0, 1.0, 0.1, 0.01])
    rs = [train.lr_factor(s, 100, 10, sched_cfg(scheduler="cosine_restarts", warmup_epochs=0)) for s in (0, 19, 20)]
    assert rs[0] == pytest.approx(1.0) and rs[1] < 0.01 and rs[2] == pytest.approx(1.0)
    assert train.lr_factor(50, 100, 10, sched_cfg(scheduler="none", warmup_epochs=0)) == 1.0


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model(dict(TINY_VIT, depth=1))
    decay, no_decay = train.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias"} <= no
    assert {"head.weight", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= yes
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back(tmp_path, mnist_root):
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=2")) == 0
    ckpt = tmp_path / "ckpt" / RUN
    newest = ckpt / "epoch_002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    logger = setup_logging(0)
    path, state = find_resume_checkpoint(str(ckpt), -1, logger)
    assert os.path.basename(path) == "epoch_001.pt" and state["epoch"] == 1
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=3", "checkpoint.resume=true")) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "logs" / RUN)] == [1, 2, 3]


def test_resume_true_without_checkpoint_is_a_clear_error(tmp_path, mnist_root, capsys):
    assert train.main(small_run_args(tmp_path, mnist_root, "checkpoint.resume=true")) == 2
    err = capsys.readouterr().err
    assert "checkpoint.resume=true" in err and "no readable checkpoint" in err


@pytest.mark.slow
def test_resume_from_another_models_checkpoint_is_a_clear_error(tmp_path, mnist_root, capsys):
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=1")) == 0
    before = sorted(os.listdir(tmp_path / "ckpt" / RUN))
    capsys.readouterr()
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=2", "model.depth=3",
                                     "checkpoint.resume=true")) == 2
    err = capsys.readouterr().err.strip()
    assert "model.depth=" in err and "from another run" in err and "run.name" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path / "ckpt" / RUN)) == before  # nothing of the old run was touched
    # a new dropout is not another run: it resumes
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=2", "model.dropout=0.1",
                                     "checkpoint.resume=true")) == 0


# ------------------------------------------------------------------------------------ whole runs

@pytest.mark.slow
def test_training_reduces_loss_and_writes_every_output(tmp_path, mnist_root):
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=3")) == 0
    m = read_metrics(tmp_path / "logs" / RUN)
    assert [r["epoch"] for r in m] == [1, 2, 3]
    assert m[-1]["train_loss"] < 0.5 * m[0]["train_loss"]
    assert m[-1]["val_acc"] > 0.9  # the synthetic classes are easy
    for key in ("train_acc", "val_loss", "lr", "epoch_time_s", "images_per_s"):
        assert key in m[0]
    names = set(os.listdir(tmp_path / "ckpt" / RUN))
    assert {"epoch_001.pt", "epoch_002.pt", "epoch_003.pt", "best.pth", "mnist_transformer_final.pth",
            "training_curves.png"} <= names
    assert not [n for n in names if ".tmp." in n]
    log = (tmp_path / "logs" / RUN / "train.log").read_text()
    assert "rank0 INFO epoch 3/3" in log
    assert OmegaConf.load(tmp_path / "logs" / RUN / "config.yaml").train.epochs == 3
    final = load_checkpoint(str(tmp_path / "ckpt" / RUN / "mnist_transformer_final.pth"))
    model = build_model(final["model_args"])  # self-describing: rebuilt from the file alone
    model.load_state_dict(final["model"])


@pytest.mark.slow
@pytest.mark.parametrize("stop_check, more", [
    (21 + 7, ()),  # mid epoch 2 (after its step 7)
    (21, ()),  # right after epoch 1
    (21 + 7, ("train.ema=true", "train.ema_decay=0.9", "model.stem=conv"))])  # EMA and BatchNorm state too
def test_resume_is_bit_exact(tmp_path, mnist_root, monkeypatch, stop_check, more):
    extra = ("train.epochs=2", "model.dropout=0.1", "model.drop_path=0.1") + more  # RNG streams matter too
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(small_run_args(a, mnist_root, *extra)) == 0
    StopAfter.n = stop_check  # 640 images / batch 32 = 20 steps: 20 step checks + 1 epoch-end check
    real_signal = train.StopSignal
    monkeypatch.setattr(train, "StopSignal", StopAfter)
    assert train.main(small_run_args(b, mnist_root, *extra)) == 0
    assert not os.path.exists(b / "ckpt" / RUN / "mnist_transformer_final.pth")
    assert [r["epoch"] for r in read_metrics(b / "logs" / RUN)] == [1]
    monkeypatch.setattr(train, "StopSignal", real_signal)
    assert train.main(small_run_args(b, mnist_root, *extra, "checkpoint.resume=true")) == 0
    assert comparable(read_metrics(b / "logs" / RUN)) == comparable(read_metrics(a / "logs" / RUN))
    wa, wb = final_weights(a / "ckpt" / RUN), final_weights(b / "ckpt" / RUN)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    if more:
        ea, eb = (load_checkpoint(str(d / "ckpt" / RUN / "mnist_transformer_final.pth"))["ema_model"] for d in (a, b))
        assert all(torch.equal(ea[k], eb[k]) for k in ea) and not torch.equal(ea["head.weight"], wa["head.weight"])


@pytest.mark.slow
def test_mixing_runs_until_mix_off_epoch_and_the_model_still_learns(tmp_path, mnist_root, monkeypatch):
    calls = []
    real = train.mix_batch
    monkeypatch.setattr(train, "mix_batch", lambda *a: calls.append(1) or real(*a))
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=3", "data.mixup_alpha=0.8",
                                     "data.cutmix_alpha=1.0", "data.mix_off_epoch=3", "data.trivial_augment=true",
                                     "data.random_erasing=0.25")) == 0
    assert len(calls) == 2 * 20  # 640 images / batch 32: every step of epochs 1 and 2, none in epoch 3
    m = read_metrics(tmp_path / "logs" / RUN)
    assert m[-1]["val_loss"] < 0.5 * m[0]["val_loss"] and m[-1]["val_acc"] > 0.9


@pytest.mark.slow
def test_ema_is_evaluated_saved_and_preferred(tmp_path, mnist_root, capsys):
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=2", "train.ema=true",
                                     "train.ema_decay=0.9")) == 0
    m = read_metrics(tmp_path / "logs" / RUN)
    assert all(0.0 <= r["ema_val_acc"] <= 1.0 and r["ema_val_loss"] > 0 for r in m)
    assert m[-1]["ema_val_acc"] > 0.9
    final = load_checkpoint(str(tmp_path / "ckpt" / RUN / "mnist_transformer_final.pth"))
    best = load_checkpoint(str(tmp_path / "ckpt" / RUN / "best.pth"))
    assert set(final["ema_model"]) == set(final["model"]) and "ema_model" in best
    assert "done: final ema_val_acc" in (tmp_path / "logs" / RUN / "train.log").read_text()
    capsys.readouterr()
    assert train.main(["--eval"] + small_run_args(tmp_path, mnist_root)) == 0
    out = capsys.readouterr().out
    assert "(EMA weights)" in out and f"Global Accuracy: {100 * m[-1]['ema_val_acc']:.2f}%" in out


def test_eval_of_a_file_that_cannot_rebuild_its_model_is_one_line(tmp_path, mnist_root, capsys):
    bad = str(tmp_path / "weights_only.pth")
    torch.save({"model": {"head.weight": torch.zeros(1)}}, bad)
    assert train.main(["--eval", "--checkpoint", bad] + small_run_args(tmp_path, mnist_root)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no model_args/data_info" in err and "Traceback" not in err


@pytest.mark.slow
def test_eval_counts_every_test_image(tmp_path, mnist_root, capsys):
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=1")) == 0
    ckpt = str(tmp_path / "ckpt" / RUN / "mnist_transformer_final.pth")
    capsys.readouterr()
    args = small_run_args(tmp_path, mnist_root, "data.test_limit=151")
    assert train.main(["--eval", "--checkpoint", ckpt] + args) == 0
    out = capsys.readouterr().out
    assert "Total Samples: 151" in out and "Global Average Loss:" in out and "Global Accuracy:" in out
    assert os.path.exists(tmp_path / "ckpt" / RUN / "mnist_transformer_final_confusion.png")


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    """The user-level story: a real SIGTERM during epoch 2, exit 0, resume, same numbers."""
    root = tmp_path / "data"
    write_idx_set(str(root / "MNIST" / "raw"), n_train=6000, n_test=300)
    base = ["train.py"] + small_run_args(tmp_path / "x", root, "train.epochs=2", "model.dropout=0.1")
    straight = [a.replace(str(tmp_path / "x"), str(tmp_path / "s")) for a in base]
    r = subprocess.run([sys.executable] + straight, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable] + base, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = tmp_path / "x" / "logs" / RUN / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out and "Traceback" not in out
    assert [r["epoch"] for r in read_metrics(tmp_path / "x" / "logs" / RUN)] == [1]
    r = subprocess.run([sys.executable] + base + ["checkpoint.resume=true"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    got, want = read_metrics(tmp_path / "x" / "logs" / RUN), read_metrics(tmp_path / "s" / "logs" / RUN)
    assert [r["epoch"] for r in got] == [1, 2]
    for key in ("val_loss", "val_acc", "lr", "train_loss"):
        assert got[1][key] == pytest.approx(want[1][key], abs=1e-6)


@pytest.mark.slow
def test_real_mnist_short_slice(tmp_path):
    if not os.path.isfile(os.path.join(ROOT, "data", "MNIST", "raw", "train-images-idx3-ubyte.gz")):
        pytest.skip("shipped MNIST not present")
    args = [f"checkpoint.dir={tmp_path}/ckpt", f"log.dir={tmp_path}/logs", f"run.name={RUN}", "train.device=cpu",
            "train.epochs=1",
            "data.train_limit=5000", "data.test_limit=2000", "log.tensorboard=false"]
    assert train.main(args) == 0
    assert read_metrics(tmp_path / "logs" / RUN)[0]["val_acc"] > 0.85


def test_config_from_flags():
    args = train.parse_args(["--no-cuda", "train.epochs=2"])
    cfg = train.config_from_args(args)
    assert cfg.train.device == "cpu" and cfg.train.epochs == 2
    with pytest.raises(UserError):
        train.config_from_args(train.parse_args(["--no-cuda", "train.device=cuda"]))
    assert load_config(None, ["train.device=cpu"]).train.device == "cpu"
