"""Distributed training on CPU with gloo, on 127.0.0.1 only: every launcher (--num-gpus, torchrun on
one and two "nodes", a PyTorchJob-style launch by hand) must give the parameters of one process with
the same global batch; evaluation counts each image once; a failing, killed or preempted rank never
leaves the group hanging and never costs an epoch twice.

The reference is one process with batch 32; two ranks use batch 16 each (the same global batch),
so the runs agree up to floating-point order. tests/fault_driver.py injects a fault into one rank.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import launch
import train
from conftest import ROOT, RUN, read_metrics, small_run_args, write_idx_set
from launch import free_port
from utils import UserError, load_config

N_TRAIN, N_TEST = 640, 1001   # 20 steps per epoch at global batch 32; an odd test split
EPOCHS = ("train.epochs=2",)
TWO_RANKS = ("train.batch_size=16",)  # per rank: global batch 32, as the reference
WEIGHT_TOL = 1e-5                # same run up to floating-point order (measured: 2.4e-7)
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
TRAIN_PY = os.path.join(ROOT, "train.py")
DRIVER = os.path.join(ROOT, "tests", "fault_driver.py")


# ------------------------------------------------------------------------------------------ helpers

def clean_env(**extra):
    """The test's own environment minus any launcher variables, one thread per process (2 cores)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("TORCHELASTIC")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def start(cmd, out_dir, name, env):
    """Start a process with stdout and stderr in files (a full pipe would block a worker)."""
    os.makedirs(out_dir, exist_ok=True)
    out = open(os.path.join(out_dir, f"{name}.out"), "w")
    err = open(os.path.join(out_dir, f"{name}.err"), "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)


def wait_all(procs, timeout):
    """Exit codes and the seconds each process took; kills everything still alive at the deadline."""
    t0, took = time.time(), [None] * len(procs)
    try:
        while any(t is None for t in took):
            for i, p in enumerate(procs):
                if took[i] is None and p.poll() is not None:
                    took[i] = time.time() - t0
            if time.time() - t0 > timeout:
                raise AssertionError(f"processes still running after {timeout}s (finished after: {took})")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], took


def read_text(out_dir, name):
    with open(os.path.join(out_dir, name)) as f:
        return f.read()


def by_hand(argvs, out_dir, timeout=240, **env):
    """A PyTorchJob pod's view: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; LOCAL_RANK not."""
    port, world = free_port(), len(argvs)
    procs = [start([sys.executable] + argv, out_dir, f"rank{r}",
                   clean_env(RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env))
             for r, argv in enumerate(argvs)]
    return wait_all(procs, timeout)


def torchrun(flags, script_argv, out_dir, name, **env):
    return start([sys.executable, "-m", "torch.distributed.run"] + flags + script_argv, out_dir, name, clean_env(**env))


def final_weights(run_dir, name="mnist_transformer_final.pth"):
    """The weights, less the key third of each qkv bias: softmax ignores it, so its true gradient is
    zero and Adam turns the rounding noise there into full-size steps of +-lr."""
    w = torch.load(os.path.join(run_dir, "ckpt", RUN, name), map_location="cpu", weights_only=True)["model"]
    for k in [k for k in w if k.endswith("attn.qkv.bias")]:
        q, _, v = w[k].chunk(3)
        w[k] = torch.cat([q, v])
    return w


def max_weight_diff(dir_a, dir_b):
    wa, wb = final_weights(dir_a), final_weights(dir_b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def assert_same_run(run_dir, reference):
    """Same parameters (allclose) and the same per-epoch metrics as the one-process reference."""
    assert max_weight_diff(run_dir, reference) < WEIGHT_TOL
    got, want = read_metrics(os.path.join(run_dir, "logs", RUN)), read_metrics(os.path.join(reference, "logs", RUN))
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=2e-3 if key.endswith("acc") else 1e-6), key


def args_for(run_dir, data_root, *extra):
    return small_run_args(run_dir, data_root, *EPOCHS, *extra)


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_data")
    write_idx_set(str(root / "MNIST" / "raw"), n_train=N_TRAIN, n_test=N_TEST)
    return str(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """One process, batch 32, 2 epochs: what every 2-rank launcher must reproduce."""
    run_dir = str(tmp_path_factory.mktemp("ref"))
    assert train.main(args_for(run_dir, data_root)) == 0
    return run_dir


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, data_root):
    """python train.py --num-gpus 2 train.device=cpu, batch 16 per rank."""
    run_dir = str(tmp_path_factory.mktemp("spawned"))
    cmd = [sys.executable, TRAIN_PY, "--num-gpus", "2"] + args_for(run_dir, data_root, *TWO_RANKS)
    r = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir, r.stdout + r.stderr


# ---------------------------------------------------------------------------------- fast unit pieces

def test_dist_env_pytorchjob_has_no_local_rank(monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    assert launch.dist_env(None) == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launch.dist_env(None) == (3, 4, 0)  # PyTorchJob pod: LOCAL_RANK unset -> 0
    assert launch.dist_env(train.parse_args(["--local-rank", "1"]).local_rank) == (3, 4, 1)
    assert launch.dist_env(train.parse_args(["--local_rank=2"]).local_rank) == (3, 4, 2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch.dist_env(train.parse_args(["--local_rank", "1"]).local_rank) == (3, 4, 0)  # the environment wins


@pytest.mark.parametrize("env,named", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"RANK": "two", "WORLD_SIZE": "2"}, "RANK='two' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2 and WORLD_SIZE=2"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x'")])
def test_bad_launcher_variables_are_one_line_errors(monkeypatch, capsys, env, named):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert train.main(["train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and "Traceback" not in err


def test_leave_group_waits_for_every_rank_and_rank0_goes_last(monkeypatch):
    """No rank closes its gloo sockets while another may still be in the last collective."""
    import threading
    store = torch.distributed.HashStore()
    monkeypatch.setitem(launch._GROUP, "store", store)
    left = []

    def leave(r):
        launch.leave_group(r, 3, 10)
        left.append((r, torch.distributed.PrefixStore("leave", store).add("left", 0)))
    ranks = [threading.Thread(target=leave, args=(r,)) for r in (0, 1)]
    for t in ranks:
        t.start()
    time.sleep(0.3)
    assert left == []  # rank 2 has not finished: nobody leaves
    launch.leave_group(2, 3, 10)
    for t in ranks:
        t.join(10)
    assert sorted(left)[0] == (0, 2) and sorted(left)[1][0] == 1  # rank 0 left after ranks 1 and 2
    monkeypatch.setitem(launch._GROUP, "store", torch.distributed.HashStore())
    with pytest.raises(TimeoutError) as e:  # a rank that never comes: the lost-peer error, after the timeout
        launch.leave_group(0, 2, 0.2)
    assert launch.lost_peer(e.value, 2)


def test_backend_choice_libuv_and_mps(monkeypatch):
    assert launch.pick_backend("auto", torch.device("cpu")) == "gloo"
    monkeypatch.setattr(sys, "platform", "linux")
    assert launch.pick_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert launch.pick_backend("gloo", torch.device("cuda", 0)) == "gloo"
    monkeypatch.setattr(sys, "platform", "win32")
    assert launch.pick_backend("auto", torch.device("cuda", 0)) == "gloo"
    seen = {}
    monkeypatch.delenv("USE_LIBUV", raising=False)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setattr(launch, "group_store", lambda *a: seen.update(libuv=os.environ.get("USE_LIBUV")) or "store")
    monkeypatch.setattr(launch.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    cfg = load_config(None, ["train.device=cpu"])
    launch.init_distributed(cfg, torch.device("cpu"), 1, 2)
    assert seen["backend"] == "gloo" and seen["libuv"] == "0" and seen["world_size"] == 2  # set before rendezvous
    assert seen["store"] == "store" and launch._GROUP["store"] == "store"  # kept for leave_group()
    launch._GROUP.clear()
    with pytest.raises(UserError, match="MPS cannot run more than one process"):
        launch.init_distributed(cfg, torch.device("mps"), 0, 2)
    with pytest.raises(UserError, match="nccl needs CUDA"):
        launch.init_distributed(load_config(None, ["distributed.backend=nccl"]), torch.device("cpu"), 0, 2)


def test_num_gpus_without_gpus_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    assert train.main(["--num-gpus", "2", "--no-mps"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no GPU is visible" in err and "train.device=cpu" in err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert train.main(["--num-gpus", "2", "train.device=cpu"]) == 2
    assert "cannot be used under torchrun" in capsys.readouterr().err


def test_lost_peer_is_recognised():
    gloo = RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:1234. This is typically ...")
    assert launch.lost_peer(gloo, 2) and not launch.lost_peer(gloo, 1)
    assert launch.lost_peer(RuntimeError("Timed out waiting 5000ms for recv operation to complete"), 2)
    bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    assert not launch.lost_peer(bug, 2)  # a bug keeps its traceback


# ------------------------------------------------------------------------------- launchers, parity

@pytest.mark.slow
def test_num_gpus_2_on_cpu_matches_one_process(spawned, reference):
    """DDP parity: 2 ranks x batch 16 == 1 rank x batch 32, and only rank 0 wrote anything."""
    run_dir, out = spawned
    assert_same_run(run_dir, reference)
    assert [r["world_size"] for r in read_metrics(os.path.join(run_dir, "logs", RUN))] == [2, 2]
    assert "world size 2" in out and "global batch 32" in out
    assert "rank1 INFO" not in out and "rank1" not in read_text(run_dir, f"logs/{RUN}/train.log")
    # the tolerance is tight: one epoch of training moves the weights a thousand times further
    first, last = final_weights(reference, "epoch_001.pt"), final_weights(reference)
    assert max((first[k] - last[k]).abs().max().item() for k in last) > 1000 * WEIGHT_TOL
    files = [sorted(os.listdir(os.path.join(d, "ckpt", RUN))) for d in (run_dir, reference)]
    assert files[0] == files[1]


@pytest.mark.slow
def test_eval_counts_each_image_once_under_torchrun(spawned, data_root, tmp_path, capsys):
    """1001 test images on 2 ranks: no padded duplicate, no dropped tail, the 1-process numbers."""
    ckpt = os.path.join(spawned[0], "ckpt", RUN, "mnist_transformer_final.pth")
    argv = ["--eval", "--checkpoint", ckpt] + small_run_args(tmp_path, data_root)
    capsys.readouterr()
    assert train.main(argv) == 0
    one = capsys.readouterr().out
    p = torchrun(["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())],
                 [TRAIN_PY] + argv, str(tmp_path), "torchrun")
    codes, _ = wait_all([p], 180)
    two = read_text(str(tmp_path), "torchrun.out")
    assert codes == [0], two + read_text(str(tmp_path), "torchrun.err")
    pick = lambda text: [ln for ln in text.splitlines() if ln.startswith(("Total", "Global", "  class"))]  # noqa: E731
    assert "Total Samples: 1001" in pick(one) and len(pick(one)) == 13
    assert pick(two) == pick(one)


@pytest.mark.slow
def test_two_node_torchrun_on_loopback(reference, data_root, tmp_path):
    """--nnodes 2 --node_rank 0/1 --master_addr 127.0.0.1: one process per 'node'."""
    run_dir, port = str(tmp_path / "run"), str(free_port())
    argv = [TRAIN_PY] + args_for(run_dir, data_root, *TWO_RANKS)
    nodes = [torchrun(["--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                       "--master_port", port], argv, str(tmp_path), f"node{r}") for r in (0, 1)]
    codes, _ = wait_all(nodes, 240)
    assert codes == [0, 0], read_text(str(tmp_path), "node0.err") + read_text(str(tmp_path), "node1.err")
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_pytorchjob_style_launch_by_hand(reference, data_root, tmp_path):
    """RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by hand, no LOCAL_RANK, environment=k8s."""
    run_dir = str(tmp_path / "run")
    argv = [TRAIN_PY, "environment=k8s"] + args_for(run_dir, data_root, *TWO_RANKS)
    codes, _ = by_hand([argv, argv], str(tmp_path))
    assert codes == [0, 0], read_text(str(tmp_path), "rank0.err") + read_text(str(tmp_path), "rank1.err")
    assert_same_run(run_dir, reference)
    saved = read_text(run_dir, f"logs/{RUN}/config.yaml")
    assert "environment: k8s" in saved and "resume: auto" in saved  # the k8s profile applied under the overrides
    assert "INFO" not in read_text(str(tmp_path), "rank1.out")  # other ranks: warnings only


@pytest.mark.slow
def test_val_split_counts_are_exact_on_2_ranks(data_root, tmp_path):
    """data.val_split=0.1 of 640 images on 2 ranks: every epoch validates on exactly the 64 held-out
    images, the test split (1001) is evaluated once at the end, and the numbers are the 1-process ones."""
    import json
    held = ("data.val_split=0.1",)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train.main(args_for(one, data_root, *held)) == 0
    cmd = [sys.executable, TRAIN_PY, "--num-gpus", "2"] + args_for(two, data_root, *held, *TWO_RANKS)
    r = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m1, m2 = (read_metrics(os.path.join(d, "logs", RUN)) for d in (one, two))
    assert [rec["val_images"] for rec in m2] == [64, 64] and [rec["world_size"] for rec in m2] == [2, 2]
    for a, b in zip(m1, m2):
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=2e-3) and a["val_loss"] == pytest.approx(b["val_loss"],
                                                                                                         rel=1e-4)
    s1, s2 = (json.load(open(os.path.join(d, "logs", RUN, "summary.json"))) for d in (one, two))
    assert s1["test_images"] == s2["test_images"] == 1001
    assert s2["test_acc"] == pytest.approx(s1["test_acc"], abs=2e-3)


# --------------------------------------------------------------------------------- resume N -> M

@pytest.mark.slow
def test_checkpoint_from_2_ranks_resumes_on_1(spawned, reference, data_root, tmp_path):
    """epoch_001.pt of the 2-rank run, continued by 1 process with the same global batch, ends where
    the 1-process run ends; with a different global batch the lr schedule still ends at its end."""
    for name, batch in (("same", 32), ("half", 16)):
        run_dir = tmp_path / name
        shutil.copytree(os.path.join(spawned[0], "ckpt", RUN), run_dir / "ckpt" / RUN)
        for f in ("epoch_002.pt", "mnist_transformer_final.pth"):
            os.remove(run_dir / "ckpt" / RUN / f)
        argv = args_for(str(run_dir), data_root, f"train.batch_size={batch}", "checkpoint.resume=true")
        assert train.main(argv) == 0
        m = read_metrics(run_dir / "logs" / RUN)
        assert [r["epoch"] for r in m] == [1, 2] and [r["world_size"] for r in m] == [2, 1]
        assert m[-1]["lr"] == 0.0  # cosine to 0: the schedule counted the new world's steps
        if name == "same":
            assert_same_run(str(run_dir), reference)
        else:
            assert "global batch of 32, continuing with 16" in read_text(str(run_dir), f"logs/{RUN}/train.log")
            assert m[-1]["val_acc"] > 0.9


# ------------------------------------------------------------------------------------------- faults

@pytest.mark.slow
def test_preempting_one_pod_saves_one_checkpoint_then_resumes(reference, data_root, tmp_path):
    """SIGTERM to rank 1 alone, mid epoch 2, in a PyTorchJob-style group: both ranks agree on one
    step checkpoint and exit 143 (a PyTorchJob restarts such pods; 0 would end the job). The run
    continued by one process with batch 32 (checkpoint.resume: auto in k8s) ends where the reference ends."""
    run_dir = str(tmp_path / "run")
    k8s = ("environment=k8s",) + tuple(args_for(run_dir, data_root))
    argv = [DRIVER, "term", "1", "25", *k8s, *TWO_RANKS, "train.log_interval=4"]
    codes, _ = by_hand([argv, argv], str(tmp_path))
    err = read_text(str(tmp_path), "rank0.err") + read_text(str(tmp_path), "rank1.err")
    assert codes == [143, 143], err
    assert "Traceback" not in err
    ckpts = sorted(n for n in os.listdir(os.path.join(run_dir, "ckpt", RUN)) if n.startswith("epoch_"))
    assert ckpts == ["epoch_001.pt", "epoch_001_step000008.pt"]  # call 25 = epoch 2 step 5; agreed at step 8
    assert [r["epoch"] for r in read_metrics(os.path.join(run_dir, "logs", RUN))] == [1]
    assert "stopped by signal at epoch 2, step 8/20" in read_text(run_dir, f"logs/{RUN}/train.log")
    assert train.main(list(k8s)) == 0
    assert "resumed from" in read_text(run_dir, f"logs/{RUN}/train.log")
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_under_torchrun(reference, data_root, tmp_path):
    """torchrun --max-restarts 1: SIGKILL of rank 0 (the writer) in epoch 2; the group restarts,
    resumes from epoch_001.pt on its own, and every epoch is in metrics.jsonl once."""
    run_dir = str(tmp_path / "run")
    argv = [DRIVER, "kill", "0", "25"] + args_for(run_dir, data_root, *TWO_RANKS, "distributed.timeout_s=30")
    p = torchrun(["--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{free_port()}"], argv, str(tmp_path), "torchrun")
    codes, _ = wait_all([p], 300)
    out = read_text(str(tmp_path), "torchrun.out") + read_text(str(tmp_path), "torchrun.err")
    assert codes == [0], out
    assert "resumed from" in out and "epoch_001.pt (epoch 1, step 0)" in out
    assert [r["epoch"] for r in read_metrics(os.path.join(run_dir, "logs", RUN))] == [1, 2]
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["bad_data_on_rank0", "crash_in_step_on_rank1"])
def test_a_failing_rank_ends_the_group(fault, data_root, tmp_path):
    """Every process exits non-zero, long before distributed.timeout_s; the survivor says why in
    one line."""
    base = args_for(str(tmp_path / "run"), data_root, *TWO_RANKS, "distributed.timeout_s=60", "data.download=false")
    if fault == "bad_data_on_rank0":  # rank 0 also hosts the rendezvous store
        argvs = [[TRAIN_PY] + base + ["data.data_root=/nonexistent"], [TRAIN_PY] + base]
        failing, survivor = 0, 1
    else:
        argvs = [[DRIVER, "raise", "1", "5"] + base] * 2
        failing, survivor = 1, 0
    codes, took = by_hand(argvs, str(tmp_path), timeout=90)
    assert all(c != 0 for c in codes), codes
    assert 1 <= codes[failing] <= 127 and codes[survivor] == launch.EXIT_LOST_PEER, codes  # only the survivor retries
    assert took[survivor] - took[failing] < 20, took  # the crash is seen at once, not after the 60 s timeout
    cause = read_text(str(tmp_path), f"rank{failing}.err")
    assert ("/nonexistent/MNIST/raw" in cause) if failing == 0 else ("injected failure" in cause)
    said = read_text(str(tmp_path), f"rank{survivor}.err")
    assert f"error (rank {survivor}): another rank failed" in said and "Traceback" not in said
