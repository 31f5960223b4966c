"""Run folders: two runs never share files, a resume says what it does and changes nothing when
there is nothing to do, jobs with their own names on one volume stay apart, a run folder is
locked while written, the validation split, and progress lines for a log file."""
import glob
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import infer
import train
from checkpoint import load_checkpoint
from conftest import ROOT, comparable, read_metrics, small_run_args, write_idx_set
from data import hold_out, load_data
from runs import RunLock, choose_run
from utils import UserError, load_config


def tree_hashes(*folders):
    """{path: sha256} of every file under the folders."""
    out = {}
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def named(tmp_path, data_root, name, *extra):
    """small_run_args with another run name."""
    return [a for a in small_run_args(tmp_path, data_root, *extra) if not a.startswith("run.name=")] + [
        f"run.name={name}"]


class StopAfter(train.StopSignal):
    """As if SIGTERM arrived just before the n-th stop check (one per step, one per epoch end)."""
    n = 0

    def __init__(self):
        super().__init__()
        self.calls = 0

    def agreed(self, device, world):
        self.calls += 1
        return self.calls >= self.n


# ------------------------------------------------------------------------------------- fast tier

def test_a_fresh_start_never_reuses_a_run_with_records(tmp_path):
    cfg = load_config(None, [f"checkpoint.dir={tmp_path}/ckpt", f"log.dir={tmp_path}/logs", "run.name=x"])
    os.makedirs(tmp_path / "ckpt" / "x")
    (tmp_path / "ckpt" / "x" / "epoch_001.pt").write_bytes(b"")
    with pytest.raises(UserError, match="run 'x' already has records .* checkpoint.resume=true"):
        choose_run(cfg, None)
    auto = load_config(None, [f"checkpoint.dir={tmp_path}/ckpt", f"log.dir={tmp_path}/logs"])
    first, second = choose_run(auto, None), None
    os.makedirs(first.ckpt)
    second = choose_run(auto, None)  # the same second: a suffix keeps them apart
    assert first.name.startswith("mnist-vit-") and second.name != first.name and not first.resume
    with pytest.raises(UserError, match="run.name='../x' is not a folder name"):
        choose_run(load_config(None, ["run.name=../x"]), None)


def test_resume_true_continues_the_newest_run_or_the_named_one(tmp_path):
    base = [f"checkpoint.dir={tmp_path}/ckpt", f"log.dir={tmp_path}/logs"]
    with pytest.raises(UserError, match="holds no run to continue"):
        choose_run(load_config(None, base + ["checkpoint.resume=true"]), None)
    for name in ("old", "new"):
        os.makedirs(tmp_path / "ckpt" / name)
    (tmp_path / "ckpt" / "latest").write_text("new\n")
    run = choose_run(load_config(None, base + ["checkpoint.resume=true"]), None)
    assert (run.name, run.resume, run.required) == ("new", True, True)
    run = choose_run(load_config(None, base + ["checkpoint.resume=true", "run.name=old"]), None)
    assert run.name == "old" and run.ckpt == os.path.join(f"{tmp_path}/ckpt", "old")
    run = choose_run(load_config(None, base + ["checkpoint.resume=auto", "run.name=job-7"]), None)
    assert (run.name, run.resume, run.required) == ("job-7", True, False)  # auto: continue only if it has one


def test_a_locked_run_folder_is_refused_with_its_holder(tmp_path):
    held = RunLock(str(tmp_path / "run"))
    held.claim()
    with pytest.raises(UserError) as e:
        RunLock(str(tmp_path / "run"))
    assert f"pid {os.getpid()}" in str(e.value) and "in use" in str(e.value)
    held.file.close()
    RunLock(str(tmp_path / "run")).file.close()  # free again once the holder is gone


@pytest.mark.parametrize("key", ["checkpoint.dir", "log.dir"])
def test_an_unwritable_output_folder_stops_before_training(tmp_path, mnist_root, capsys, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = small_run_args(tmp_path, mnist_root) + [f"{key}={blocker}"]
    assert train.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "is not a folder" in err and "Traceback" not in err


def test_hold_out_is_stratified_exact_and_fixed_by_the_seed():
    labels = torch.tensor([0] * 5923 + [1] * 6742 + [2] * 5958 + [3] * 335)
    keep, val = hold_out(labels, 0.1, seed=42)
    assert len(val) == round(len(labels) * 0.1) and len(keep) + len(val) == len(labels)
    assert not set(keep.tolist()) & set(val.tolist())
    counts = torch.bincount(labels[val], minlength=4).double()
    assert ((counts - 0.1 * torch.bincount(labels, minlength=4)).abs() < 1).all()  # each class its 10%, +-1 image
    assert torch.equal(hold_out(labels, 0.1, seed=42)[1], val) and not torch.equal(hold_out(labels, 0.1, 43)[1], val)


def test_val_split_of_real_mnist_holds_out_6000(tmp_path):
    if not os.path.isfile(os.path.join(ROOT, "data", "MNIST", "raw", "train-images-idx3-ubyte.gz")):
        pytest.skip("shipped MNIST not present")
    cfg = load_config(None, [f"data.data_root={ROOT}/data", "data.val_split=0.1"])
    splits = load_data(cfg.data, 28, torch.device("cpu"), seed=42)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000) and splits.held_out


# ------------------------------------------------------------------------------------- whole runs

@pytest.mark.slow
def test_two_runs_in_a_row_keep_separate_records(tmp_path, mnist_root, capsys):
    base = [a for a in small_run_args(tmp_path, mnist_root, "train.epochs=2", "log.tensorboard=true")
            if not a.startswith("run.name=")]
    assert train.main(base) == 0
    assert train.main(base + ["train.lr=0.001"]) == 0
    runs = sorted(os.listdir(tmp_path / "logs"))
    assert len(runs) == 2 and sorted(n for n in os.listdir(tmp_path / "ckpt") if n != "latest") == runs
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == runs[1]
    lrs = []
    for name in runs:
        m = read_metrics(tmp_path / "logs" / name)
        assert [r["epoch"] for r in m] == [1, 2]
        assert glob.glob(str(tmp_path / "logs" / name / "tensorboard" / "events.out.tfevents.*"))
        final = load_checkpoint(str(tmp_path / "ckpt" / name / "mnist_transformer_final.pth"))
        lrs.append(final["config"]["train"]["lr"])
        assert json.loads((tmp_path / "logs" / name / "summary.json").read_text())["run"] == name
    assert lrs == [0.003, 0.001]
    capsys.readouterr()
    assert infer.main(["--images", os.path.join(ROOT, "test_digit"), "--checkpoint", str(tmp_path / "ckpt"), "--json",
                       "--no-show", "--output",
                       str(tmp_path / "out")]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 10  # the newest run's final weights, found by default


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_no_file(tmp_path, mnist_root, capsys):
    args = small_run_args(tmp_path, mnist_root, "train.epochs=2")
    assert train.main(args) == 0
    before = tree_hashes(tmp_path / "ckpt", tmp_path / "logs")
    capsys.readouterr()
    assert train.main(args + ["checkpoint.resume=true", "train.lr=0.0005"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "has finished" in out[0] and "raise train.epochs" in out[0]
    assert tree_hashes(tmp_path / "ckpt", tmp_path / "logs") == before


@pytest.mark.slow
def test_a_resume_that_changes_keys_records_them_beside_the_first_config(tmp_path, mnist_root):
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=1")) == 0
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=2", "train.lr=0.001",
                                     "checkpoint.resume=true")) == 0
    logs = tmp_path / "logs" / "t"
    assert OmegaConf.load(logs / "config.yaml").train.lr == 0.003  # the run's first config stays
    history = [json.loads(line) for line in (logs / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["from_epoch"] == 1
    assert history[0]["changes"] == {"train.epochs": [1, 2], "train.lr": [0.003, 0.001]}
    assert [r["epoch"] for r in read_metrics(logs)] == [1, 2]


@pytest.mark.slow
def test_k8s_jobs_with_their_own_names_share_the_volumes(tmp_path, mnist_root, monkeypatch):
    """Two PyTorchJobs with other names on the same /checkpoints and /logs: the second starts its
    own run and leaves the first untouched; the first, preempted and restarted, resumes exactly."""
    k8s = ("environment=k8s", "train.epochs=2", "model.dropout=0.1")
    ref = tmp_path / "ref"
    assert train.main(small_run_args(ref, mnist_root, *k8s)) == 0  # uninterrupted: what job-a must give
    job_a = named(tmp_path, mnist_root, "job-a", *k8s)
    StopAfter.n = 21 + 7  # SIGTERM in epoch 2
    monkeypatch.setattr(train, "StopSignal", StopAfter)
    assert train.main(job_a) == 143  # preempted in a pod: the operator restarts it
    monkeypatch.undo()
    a_files = tree_hashes(tmp_path / "ckpt" / "job-a", tmp_path / "logs" / "job-a")
    assert train.main(named(tmp_path, mnist_root, "job-b", *k8s, "train.lr=0.001")) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "logs" / "job-b")] == [1, 2]
    assert tree_hashes(tmp_path / "ckpt" / "job-a", tmp_path / "logs" / "job-a") == a_files
    assert train.main(job_a) == 0  # the restarted pod: checkpoint.resume=auto finds job-a's checkpoint
    assert comparable(read_metrics(tmp_path / "logs" / "job-a")) == comparable(read_metrics(ref / "logs" / "t"))
    wa = load_checkpoint(str(tmp_path / "ckpt" / "job-a" / "mnist_transformer_final.pth"))["model"]
    wr = load_checkpoint(str(ref / "ckpt" / "t" / "mnist_transformer_final.pth"))["model"]
    assert all(torch.equal(wa[k], wr[k]) for k in wr)


@pytest.mark.slow
def test_val_split_selects_on_held_out_images_and_tests_once(tmp_path, mnist_root):
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=2", "data.val_split=0.1",
                                     "train.early_stop_patience=5")) == 0
    m = read_metrics(tmp_path / "logs" / "t")
    assert [r["val_images"] for r in m] == [64, 64]  # 10% of 640, never the 200 test images
    summary = json.loads((tmp_path / "logs" / "t" / "summary.json").read_text())
    assert summary["test_images"] == 200 and 0.5 < summary["test_acc"] <= 1.0
    assert summary["test_loss"] != m[-1]["val_loss"]
    assert "test: loss" in (tmp_path / "logs" / "t" / "train.log").read_text()


@pytest.mark.slow
def test_progress_lines_reach_a_log_file(tmp_path):
    root = tmp_path / "data"
    write_idx_set(str(root / "MNIST" / "raw"), n_train=8000, n_test=200)
    args = small_run_args(tmp_path, root, "train.epochs=2", "log.progress_s=0.5")
    with open(tmp_path / "out.txt", "w") as out:
        r = subprocess.run([sys.executable, "train.py"] + args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                           timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    text = (tmp_path / "out.txt").read_text()
    assert r.returncode == 0, text
    lines = [line for line in text.splitlines() if "ETA epoch" in line]
    assert len(lines) >= 2 and all("img/s" in line and "run 0:" in line for line in lines), text
    assert "epoch 2/2 step" in text
