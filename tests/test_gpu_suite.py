"""gpu_suite.py without a GPU: the report writer (JSON and markdown), the CIFAR-format data maker,
the device slug, a failing or oversized piece, a command past its time limit, the comparison of
two runs' metrics, and `python bench.py --suite gpu` on a machine without CUDA."""
import json
import os
import pickle
import sys

import torch

import data
import gpu_suite
from conftest import run_cli

def test_device_slug():
    assert gpu_suite.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_suite.device_slug("  Tesla T4 (PCIe) ") == "tesla-t4-pcie"
    assert gpu_suite.device_slug("###") == "gpu"


def test_cifar_format_data_loads_back_as_cifar10(tmp_path):
    folder = gpu_suite.write_cifar(str(tmp_path / "cifar-10-batches-py"), per_batch=20, n_test=12, seed=3)
    tx, ty, vx, vy, info = data.load_raw("cifar10", str(tmp_path), download=False)
    assert tx.shape == (100, 3, 32, 32) and vx.shape == (12, 3, 32, 32) and tx.dtype == torch.uint8
    assert ty.min() >= 0 and ty.max() <= 9 and len(set(ty.tolist())) > 5 and info.native_size == 32
    with open(os.path.join(folder, "data_batch_2"), "rb") as f:
        second = pickle.load(f)
    assert torch.equal(tx[20], torch.from_numpy(second[b"data"][0].reshape(3, 32, 32)))
    assert ty[20:40].tolist() == second[b"labels"]


def fake_report():
    pieces = {"environment": {"ok": True, "summary": "H100, torch 2.11", "torch": "2.11.0", "cuda": "13.0",
                              "seconds": 0.1},
              "mnist_epochs": {"ok": True, "summary": "bf16 0.97", "seconds": 42.0,
                               "rows": [{"mode": "bf16", "val_acc": 0.9712, "images_per_s": 51234.5},
                                        {"mode": "fp16|scaler", "val_acc": 0.97, "exit": 0}]},
              "launchers": {"ok": False, "summary": "torchrun_1: DIFFERENT", "seconds": 20.0, "output": "x"},
              "cuda_tests": {"ok": None, "summary": "skipped: 12 s left, needs ~60 s"}}
    return gpu_suite.make_report("NVIDIA H100 80GB HBM3", pieces, 123.45, date="2026-11-24")


def test_report_is_written_as_json_and_markdown(tmp_path):
    json_path, md_path = gpu_suite.write_report(fake_report(), str(tmp_path / "results" / "gpu"))
    assert json_path.endswith("results/gpu/nvidia-h100-80gb-hbm3-2026-11-24.json")
    assert md_path == json_path[:-5] + ".md"
    with open(json_path) as f:
        back = json.load(f)
    assert (back["passed"], back["failed"], back["skipped"], back["total_s"]) == (2, 1, 1, 123.5)
    assert back["pieces"]["mnist_epochs"]["rows"][0]["images_per_s"] == 51234.5
    md = open(md_path).read().splitlines()
    assert md[0] == "# GPU suite: NVIDIA H100 80GB HBM3, 2026-11-24"
    assert "2 passed, 1 failed, 1 skipped, 123.5 s in all" in md[2]
    assert "| launchers | **FAILED** | 20.0 | torchrun_1: DIFFERENT |" in md
    assert "| cuda_tests | skipped | - | skipped: 12 s left, needs ~60 s |" in md
    table = md[md.index("## mnist_epochs") + 2:]
    assert table[0] == "| mode | val_acc | images_per_s | exit |" and table[1] == "| --- | --- | --- | --- |"
    assert table[2] == "| bf16 | 0.9712 | 51234.5 |  |" and table[3] == "| fp16\\|scaler | 0.97 |  | 0 |"


def test_a_piece_that_fails_or_does_not_fit_is_recorded_and_the_suite_goes_on():
    suite = gpu_suite.Suite(torch.device("cpu"), budget_s=100)
    suite.run("broken", lambda s: 1 / 0, 5)
    suite.run("fine", lambda s: {"ok": True, "summary": "fine"}, 5)
    suite.run("too_long", lambda s: {"ok": True}, 500)
    assert suite.pieces["broken"]["ok"] is False and "ZeroDivisionError" in suite.pieces["broken"]["summary"]
    assert suite.pieces["fine"]["ok"] is True and suite.pieces["too_long"]["ok"] is None
    assert 10 <= suite.timeout(1000) <= 130 and suite.timeout(20) == 20
    os.rmdir(suite.work)


def test_a_command_past_its_time_limit_is_ended_and_recorded():
    code, seconds, out = gpu_suite.cli([sys.executable, "-c", "import time; print('started', flush=True); "
                                        "time.sleep(60)"], timeout=2)
    assert code is None and 2 <= seconds < 30 and "started" in out
    code, _, out = gpu_suite.cli([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], timeout=30)
    assert code == 3 and out.strip() == "x"


def test_same_run_compares_metrics_within_cuda_tolerance():
    a = [{"epoch": 1, "val_acc": 0.97, "train_loss": 0.5, "epoch_time_s": 1.0}]
    b = [{"epoch": 1, "val_acc": 0.972, "train_loss": 0.502, "epoch_time_s": 2.0}]
    assert gpu_suite.same_run(a, [dict(a[0], epoch_time_s=3.0)])[:2] == (True, True)
    identical, close, diffs = gpu_suite.same_run(b, a)
    assert not identical and close and diffs == {"max_d_val_acc": 0.002, "max_rel_d_train_loss": 0.004}
    assert gpu_suite.same_run([dict(a[0], val_acc=0.9)], a)[1] is False and gpu_suite.same_run([], a)[1] is False


def test_the_gpu_suite_without_cuda_is_one_line_and_exit_2():
    r = run_cli(["bench.py", "--suite", "gpu"])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: the GPU suite needs a CUDA GPU; ") and r.stderr.count("\n") == 1
