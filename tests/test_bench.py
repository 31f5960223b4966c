"""bench.py on a tiny synthetic IDX set: the JSON lines, the arithmetic behind them, --baseline,
--target-acc with --max-train-s, and the one-line errors."""
import json
import statistics

import pytest
import torch

import bench
from conftest import write_idx_set

TINY = ["train.device=cpu", "model.dim=32", "model.depth=2", "model.heads=2", "train.batch_size=32",
        "train.eval_batch_size=64"]


@pytest.fixture(autouse=True)
def keep_threads():
    """--threads 1 keeps these tiny models fast on a loaded machine (two threads on busy cores
    wait on each other); the rest of the suite gets its thread count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run_bench(capsys, data_root, *flags):
    code = bench.main(["--threads", "1", *flags, f"data.data_root={data_root}", *TINY])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    return code, {(r["pipeline"], r["metric"]): r for r in records}, err


@pytest.fixture
def tiny_root(tmp_path):
    write_idx_set(str(tmp_path / "data" / "MNIST" / "raw"), n_train=256, n_test=100)
    return str(tmp_path / "data")


@pytest.mark.slow
def test_bench_with_baseline_reports_consistent_numbers(capsys, tiny_root):
    code, rec, err = run_bench(capsys, tiny_root, "--baseline", "--windows", "3", "--window-steps", "2",
                               "--warmup-steps", "1", "--eval-images", "0")
    assert code == 0
    for pipeline in ("ours", "baseline"):
        for metric in ("train_images_per_s", "epoch_time_s", "eval_images_per_s", "peak_rss_mib"):
            r = rec[(pipeline, metric)]
            assert r["value"] > 0 and r["host_cpus"] >= 1 and r["torch"] and r["device"].startswith("cpu")
        tr = rec[(pipeline, "train_images_per_s")]
        assert len(tr["windows"]) == 3 and tr["window_steps"] == 2
        assert tr["value"] == pytest.approx(statistics.median(tr["windows"]), abs=0.06)
        assert 50 < rec[(pipeline, "peak_rss_mib")]["value"] < 8192
        assert rec[(pipeline, "eval_images_per_s")]["eval_images"] == 100  # --eval-images 0: the whole test split
    # ours trains 256 // 32 * 32 = 256 images an epoch; the baseline keeps its last partial batch
    assert rec[("ours", "epoch_time_s")]["value"] == pytest.approx(256 / rec[("ours", "train_images_per_s")]["value"],
                                                                   rel=0.01, abs=0.0006)
    assert rec[("baseline", "train_images_per_s")]["config"]["batch"] == 64  # its own batch, not the config's
    assert rec[("ours", "data_load_s")]["value"] >= 0
    ratio = rec[("ratio", "train_images_per_s")]
    ours_w, base_w = rec[("ours", "train_images_per_s")]["windows"], rec[("baseline", "train_images_per_s")]["windows"]
    assert ratio["value"] == pytest.approx(statistics.median(o / r for o, r in zip(ours_w, base_w)), abs=0.001)
    assert ratio["ratio_of_medians"] == pytest.approx(
        rec[("ours", "train_images_per_s")]["value"] / rec[("baseline", "train_images_per_s")]["value"], abs=0.002)
    assert ("ratio", "peak_rss_mib") not in rec  # the two peaks have different scopes
    assert "ours/baseline" in err and "train_images_per_s" in err
    peak = rec[("device", "matmul_peak_gflops")]
    assert peak["value"] > 1 and peak["dtype"] == "float32"
    for pipeline in ("ours", "baseline"):
        train_mfu, eval_mfu = rec[(pipeline, "train_mfu")], rec[(pipeline, "eval_mfu")]
        assert 2.5 < train_mfu["flops_per_image"] / eval_mfu["flops_per_image"] < 3.5  # backward ~ 2x forward
        rate = rec[(pipeline, "train_images_per_s")]["value"]
        assert train_mfu["achieved_gflops"] == pytest.approx(train_mfu["flops_per_image"] * rate / 1e9, rel=0.01)
        assert train_mfu["value"] == pytest.approx(train_mfu["achieved_gflops"] / peak["value"], rel=0.02)
        assert 0 < train_mfu["value"] < 1.5
    assert "train_mfu" in err and "%" in err


def test_flops_are_counted_per_image_and_the_peak_is_a_rate():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    assert bench.flops_per_image(lambda: lin(x), 8) == 2 * 64 * 32  # one multiply-add per weight and image
    assert bench.flops_per_image(lambda: lin(x).sum().backward(), 8) == 3 * 2 * 64 * 32  # + grads of x and w
    assert 1e8 < bench.matmul_peak(torch.device("cpu"), torch.float32, n=256, repeats=2) < 1e14


@pytest.mark.slow
def test_target_acc_reached_and_capped(capsys, tmp_path):
    write_idx_set(str(tmp_path / "data" / "MNIST" / "raw"), n_train=2560, n_test=100)
    root = str(tmp_path / "data")
    code, rec, _ = run_bench(capsys, root, "--baseline", "--windows", "1", "--window-steps", "1", "--warmup-steps",
                             "0", "--eval-images", "64", "--target-acc", "0.9", "train.epochs=4")
    assert code == 0
    for pipeline in ("ours", "baseline"):
        r = rec[(pipeline, "time_to_0.9_s")]
        assert r["reached"] and r["final_acc"] >= 0.9 and r["value"] > 0
        assert r["curve_s_acc"][-1] == [r["value"], r["final_acc"]]
        assert all(a < 0.9 for _, a in r["curve_s_acc"][:-1])  # it stops at the first epoch that gets there
    # a cap far below one epoch stops mid-epoch: the clock ends within a few steps of it, unreached
    code, rec, _ = run_bench(capsys, root, "--baseline", "--windows", "1", "--window-steps", "1", "--warmup-steps",
                             "0", "--eval-images", "64", "--target-acc", "1.0", "--max-train-s", "0.05",
                             "train.epochs=50")
    assert code == 0
    for pipeline in ("ours", "baseline"):
        r = rec[(pipeline, "time_to_1_s")]
        assert r["value"] is None and not r["reached"] and len(r["curve_s_acc"]) == 1
        assert 0.05 <= r["train_s"] < 3.0 and r["max_train_s"] == 0.05


@pytest.mark.slow
def test_baseline_at_the_tutorial_dims(capsys, tiny_root):
    code, rec, _ = run_bench(capsys, tiny_root, "--baseline", "--baseline-dims", "tutorial", "--windows", "1",
                             "--window-steps", "1", "--warmup-steps", "0", "--eval-images", "64")
    assert code == 0
    base, ours = rec[("baseline", "train_images_per_s")]["config"], rec[("ours", "train_images_per_s")]["config"]
    assert (base["patch"], base["dim"], base["depth"], base["heads"]) == (4, 64, 6, 4)
    assert (ours["patch"], ours["dim"], ours["depth"], ours["heads"]) == (7, 32, 2, 2)
    assert rec[("ratio", "train_images_per_s")]["config"] == {"baseline_dims": "tutorial"}


@pytest.mark.parametrize("flags, needle", [
    (["--target-acc", "98"], "--target-acc 98.0 must be a fraction"),
    (["--windows", "0"], "--windows 0 must be >= 1"),
    (["model.dimm=3"], "unknown config key 'model.dimm'"),
    (["data.train_limit=8"], "fewer than one batch of 32"),
    (["--baseline", "--baseline-dims", "tutorial", "model.image_size=30", "model.patch_size=5"], "does not divide"),
])
def test_bad_input_is_one_line_error(capsys, tiny_root, flags, needle):
    code = bench.main([*flags, f"data.data_root={tiny_root}", *TINY])
    out, err = capsys.readouterr()
    assert code != 0 and out == ""
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_profile_says_where_the_time_goes(capsys, tiny_root):
    code = bench.main(["--threads", "1", "--windows", "1", "--window-steps", "1", "--warmup-steps", "1",
                       "--eval-images", "64", "--profile", "3", f"data.data_root={tiny_root}", *TINY])
    out, err = capsys.readouterr()
    shares = [r for r in map(json.loads, out.splitlines()) if r["metric"] == "profile_share"]
    assert code == 0 and len(shares) == 15 and all(r["steps"] == 3 and r["calls"] >= 1 for r in shares)
    assert 0.3 < sum(r["value"] for r in shares) <= 1.0001  # the top operators take most of the time
    assert [r["value"] for r in shares] == sorted((r["value"] for r in shares), reverse=True)
    assert any(r["op"] in ("aten::mm", "aten::addmm") for r in shares)
    assert "where 3 training steps spend their time" in err
