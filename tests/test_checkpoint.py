"""checkpoint.py without training: the save policy's files, a resume that restores every object
bit for bit, the fallback past a corrupt file, the checks that refuse another run's checkpoint,
and the loader that infer.py and --eval use."""
import logging
import os

import pytest
import torch

import checkpoint
import train
from checkpoint import Checkpointer, TrainState, find_resume_checkpoint, load_checkpoint, load_trained
from conftest import TINY_VIT, tiny_weights_file
from data import DataInfo
from runs import RunDir
from utils import UserError, atomic_write_bytes, load_config

STEPS = 10  # steps per epoch of the fake run below


def make_run(tmp_path, *overrides):
    """(cfg, ctx, Training) of a tiny CPU run whose checkpoints go to tmp_path/ckpt; no data is loaded."""
    cfg = load_config(None, [f"checkpoint.dir={tmp_path}/ckpt", f"log.dir={tmp_path}/logs", "train.device=cpu",
                             "model.dim=32", "model.depth=2", "model.heads=2", *overrides])
    info = DataInfo("mnist", [str(i) for i in range(10)], (0.1307,), (0.3081,), 1, True, 28)
    ctx = train.RunCtx(cfg, torch.device("cpu"), 0, 1, info, None, STEPS, logging.getLogger("test"))
    return cfg, ctx, train.build_training(cfg, ctx, dict(TINY_VIT))


def saver(tmp_path, cfg, ctx, model_args=None, resume=False, required=False):
    """The Checkpointer of a run whose checkpoints go straight to tmp_path/ckpt."""
    run = RunDir("t", str(tmp_path / "ckpt"), str(tmp_path / "logs"), resume, required)
    return Checkpointer(cfg, ctx, dict(model_args or TINY_VIT), run)


def take_steps(t, n):
    """n optimizer steps on random data: weights, moments, schedule and EMA all move."""
    for _ in range(n):
        loss = t.model(torch.randn(4, 1, 28, 28)).logsumexp(1).mean()
        loss.backward()
        train.optimizer_step(t, t.schedule.tcfg)


def trained_state(t, epoch):
    take_steps(t, 3)
    return TrainState(epoch=epoch, history=[{"epoch": e, "val_acc": 0.1 * e} for e in range(1, epoch + 1)],
                      best_val_acc=0.5, bad_epochs=1)


def test_atomic_write_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_write_bytes(str(path), b"old")

    def crash(fd):
        raise OSError("disk yanked")
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        atomic_write_bytes(str(path), b"new" * 1000)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_save_policy_writes_keeps_and_prunes(tmp_path):
    cfg, ctx, t = make_run(tmp_path, "checkpoint.keep_last=2", "checkpoint.save_every=2", "train.epochs=5")
    ckpt = saver(tmp_path, cfg, ctx)
    for epoch in range(1, 6):
        state = trained_state(t, epoch)
        ckpt.end_of_epoch(t, state, improved=epoch == 3, last=epoch == 5)
    state.step = 7
    ckpt.interrupted(t, state)
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert names == ["best.pth", "epoch_004.pt", "epoch_005.pt", "epoch_005_step000007.pt"]  # 2 was pruned
    assert load_checkpoint(str(tmp_path / "ckpt" / "best.pth"))["epoch"] == 3
    ckpt.end_of_epoch(t, TrainState(epoch=6), improved=False, last=True)  # a new epoch supersedes the step file
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["best.pth", "epoch_005.pt", "epoch_006.pt"]
    path = ckpt.final(t, state)
    assert os.path.basename(path) == "mnist_transformer_final.pth"
    final = load_checkpoint(path)
    assert "optimizer" not in final and final["model_args"] == TINY_VIT and final["data_info"]["dataset"] == "mnist"


def test_resume_restores_every_object_exactly(tmp_path):
    cfg, ctx, t = make_run(tmp_path, "train.ema=true", "model.stem=conv")
    model_args = dict(TINY_VIT, stem="conv")
    t = train.build_training(cfg, ctx, model_args)
    state = trained_state(t, 2)
    state.step, state.sums, state.partial_time = 4, [1.5, 3.0, 8.0], 2.5
    torch.manual_seed(123)
    saver(tmp_path, cfg, ctx, model_args).interrupted(t, state)
    after = torch.rand(3)  # what the RNG gives next in the run that was stopped
    cfg2, ctx2, fresh = make_run(tmp_path, "train.ema=true", "model.stem=conv")
    fresh = train.build_training(cfg2, ctx2, model_args)
    state2 = TrainState()
    path = saver(tmp_path, cfg2, ctx2, model_args, resume=True).resume(fresh, state2)
    assert os.path.basename(path) == "epoch_002_step000004.pt"
    assert state2 == state
    assert torch.equal(torch.rand(3), after)
    for a, b in ((t.raw, fresh.raw), (t.ema.module, fresh.ema.module)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert str(t.optimizer.state_dict()) == str(fresh.optimizer.state_dict())
    assert fresh.schedule.step_count == t.schedule.step_count == 3 and fresh.schedule.lr() == t.schedule.lr()
    assert fresh.ema.updates == t.ema.updates


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    cfg, ctx, t = make_run(tmp_path)
    ckpt = saver(tmp_path, cfg, ctx)
    for epoch in (1, 2):
        ckpt.end_of_epoch(t, trained_state(t, epoch), improved=False, last=False)
    newest = tmp_path / "ckpt" / "epoch_002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    logger = logging.getLogger("test")
    path, ckpt = find_resume_checkpoint(str(tmp_path / "ckpt"), -1, logger)
    assert os.path.basename(path) == "epoch_001.pt" and ckpt["epoch"] == 1
    with pytest.raises(UserError, match="checkpoint.resume_epoch=7: no epoch_007.pt"):
        find_resume_checkpoint(str(tmp_path / "ckpt"), 7, logger)


def test_resume_true_with_nothing_to_resume_names_the_folder(tmp_path):
    cfg, ctx, t = make_run(tmp_path)
    with pytest.raises(UserError, match=r"checkpoint.resume=true but .*ckpt holds no readable checkpoint"):
        saver(tmp_path, cfg, ctx, resume=True, required=True).resume(t, TrainState())
    assert saver(tmp_path, cfg, ctx, resume=True).resume(t, TrainState()) is None  # auto: a fresh start


def test_another_runs_checkpoint_is_refused_but_new_dropout_is_not(tmp_path):
    ckpt = {"model_args": dict(TINY_VIT), "data_info": {"dataset": "mnist"}}
    checkpoint.check_same_run("p", ckpt, dict(TINY_VIT, dropout=0.3, drop_path=0.1), "mnist")
    with pytest.raises(UserError) as e:
        checkpoint.check_same_run("p", ckpt, dict(TINY_VIT, depth=3), "fashion_mnist")
    msg = str(e.value)
    assert "data.dataset=mnist there, fashion_mnist now" in msg and "model.depth=2 there, 3 now" in msg
    assert "run.name" in msg and "\n" not in msg


def test_a_new_global_batch_rebases_position_and_schedule(tmp_path):
    cfg, ctx, t = make_run(tmp_path, "train.batch_size=16")
    state = TrainState(epoch=1, step=8)
    old = {"config": {"train": {"batch_size": 32, "grad_accum": 1}}, "world_size": 1}
    warning = checkpoint.rebase_to_global_batch(old, cfg.train, 1, t.schedule, state)
    assert state.step == 16 and t.schedule.step_count == STEPS + 16
    assert "global batch of 32, continuing with 16" in warning
    same = {"config": {"train": {"batch_size": 16, "grad_accum": 1}}, "world_size": 1}
    assert checkpoint.rebase_to_global_batch(same, cfg.train, 1, t.schedule, state) is None


def test_load_trained_rebuilds_the_model_or_says_why_not(tmp_path):
    path = str(tmp_path / "w.pth")
    want = tiny_weights_file(path, prefix="module._orig_mod.")
    model, ckpt, kind = load_trained(path)
    x = torch.randn(2, 1, 28, 28)
    assert kind == "raw" and torch.equal(model.eval()(x), want(x))
    torch.save({"model": {}}, tmp_path / "bare.pth")
    with pytest.raises(UserError, match="has no model_args/data_info"):
        load_trained(str(tmp_path / "bare.pth"))
    mixed = load_checkpoint(path)
    mixed["model_args"]["dim"] = 64
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(UserError, match="do not fit its model_args"):
        load_trained(str(tmp_path / "mixed.pth"))
    (tmp_path / "half.pth").write_bytes(open(path, "rb").read()[:500])
    with pytest.raises(UserError, match="cannot be read"):
        load_trained(str(tmp_path / "half.pth"))
