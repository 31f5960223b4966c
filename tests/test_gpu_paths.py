"""The CUDA- and MPS-only branches, checked on a CPU: how often a training step makes the host wait
for the device (counted on the `meta` device), the copies to the device, the one-GPU-per-process
check, NCCL errors, TF32 and cuDNN switches, fused AdamW and the fp16 grad scaler across a resume,
torch.compile (aot_eager) under DDP, the CUDA/MPS RNG state and device choice, through mocks.

Tests marked `cuda` need a GPU and are skipped without one: `python -m pytest -m cuda` on a GPU machine."""
import contextlib
import glob
import logging
import os
import sys
import time
import types
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import checkpoint
import augment
import data
import gpu_suite
import launch
import train
import utils
from checkpoint import Checkpointer, TrainState
from conftest import ROOT, RUN, TINY_VIT, comparable, read_metrics, run_cli, small_run_args, write_idx_set
from data import DataInfo, Split
from runs import RunDir
from utils import UserError, load_config

aten = torch.ops.aten
PRESETS = [None] + sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
HAVE_CUDA = torch.cuda.is_available()


def cuda_test(fn):
    """A check that needs a real GPU: marked `cuda`, skipped without one."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")(fn))


# ------------------------------------------------------------------------ host waits, counted

# ops whose output size depends on the data: the host must read it back before it can go on
SIZE_FROM_DATA = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten._unique2.default,
                  aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


def _cross(a, b):
    """True for a copy between the host and a device (either way)."""
    return a.type != b.type and "cpu" in (a.type, b.type)


class HostWaits(TorchDispatchMode):
    """Records every point where the host would wait for the device: a value read back (.item(),
    bool(t), .tolist(), .cpu()), a copy between host and device without non_blocking (it waits
    until the device has drained its queue), torch.tensor(host data, device=...) (the same copy,
    made below the dispatcher, so it is caught at the call), and ops whose output size depends on
    the data (nonzero, bincount, unique, masked_select). Meant for the `meta` device: its tensors
    have shapes and no data, so a whole training step costs next to nothing on a CPU while every
    boundary between host and device stays where it is on CUDA. Values read back are zeros."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def __enter__(self):
        self._real = torch.tensor, torch.as_tensor

        def caught(real):
            def make(obj, *args, **kwargs):
                out = real(obj, *args, **kwargs)
                if out.device.type != "cpu" and not (torch.is_tensor(obj) and obj.device.type != "cpu"):
                    self.waits.append(f"{real.__name__}(host data, device={out.device.type})")
                return out
            return make
        torch.tensor, torch.as_tensor = (caught(f) for f in self._real)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self._real
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args and torch.is_tensor(args[0]) else None
        on_device = first is not None and first.device.type != "cpu"
        if func is aten._local_scalar_dense.default and on_device:
            self.waits.append("item")
            return False if first.dtype == torch.bool else 0
        if func is aten._to_copy.default:
            dst = torch.device(kwargs.get("device") or first.device)
            if _cross(first.device, dst) and not kwargs.get("non_blocking"):
                self.waits.append(f"copy {first.device.type}->{dst.type}")
                if dst.type == "cpu":
                    return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype)
        if func is aten.copy_.default:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if _cross(args[0].device, args[1].device) and not non_blocking:
                self.waits.append(f"copy_ {args[1].device.type}->{args[0].device.type}")
                if args[0].device.type == "cpu":
                    return args[0]
        if func in SIZE_FROM_DATA and on_device:
            self.waits.append(str(func))
            if func is aten.bincount.default:
                return torch.zeros(kwargs.get("minlength", args[2] if len(args) > 2 else 0), dtype=torch.long,
                                   device=first.device)
            if func is aten.nonzero.default:
                return torch.empty(0, first.dim(), dtype=torch.long, device=first.device)
        return func(*args, **(kwargs or {}))


def waits_in_steps(t, ctx, split, first, last):
    """The waits of train_one_epoch over steps first..last-1."""
    state = replace(TrainState(), step=first)
    with HostWaits() as counter:
        train.train_one_epoch(t, split, replace(ctx, steps_per_epoch=last), state, train.StopSignal())
    return counter.waits


def waits_per_step(path):
    """Host waits per training step of a preset: steps 3..6 less steps 1..2, halved, so what an
    epoch does once (its permutation, the sums read back at its end) drops out; step 0 runs first,
    so what is made once and kept (normalisation constants) does not count either."""
    t, ctx, split = gpu_suite.preset_training(path, torch.device("meta"))
    waits_in_steps(t, ctx, split, 0, 1)
    two, four = waits_in_steps(t, ctx, split, 1, 3), waits_in_steps(t, ctx, split, 3, 7)
    return (len(four) - len(two)) / 2, four


@pytest.fixture
def no_autocast(monkeypatch):
    """torch.autocast has no meta device; what it changes (dtypes) waits for nothing."""
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p) if p else "config.yaml")
def test_a_training_step_never_waits_for_the_device(path, no_autocast):
    """Every preset's step: augmentation, normalisation, forward, backward, clipping, the
    optimizer, EMA and the running sums, with no host wait."""
    per_step, seen = waits_per_step(path)
    assert per_step == 0, seen


@pytest.mark.parametrize("path", [None, os.path.join(ROOT, "configs", "cifar10_vit.yaml")], ids=["mnist", "cifar"])
def test_an_evaluation_batch_never_waits_for_the_device(path, no_autocast):
    t, ctx, _ = gpu_suite.preset_training(path, torch.device("meta"))
    side, ch = (32, 3) if "cifar" in str(path) else (28, 1)
    counts = []
    for batches in (2, 4):
        n = batches * 100
        split = Split(torch.empty(n, ch, side, side, dtype=torch.uint8, device="meta"),
                      torch.empty(n, dtype=torch.long, device="meta"))
        with HostWaits() as counter:
            train.evaluate(t.raw, split, ctx, ctx.cfg.model.image_size, 100)
        counts.append(counter.waits)
    assert (len(counts[1]) - len(counts[0])) / 2 == 0, counts[1]  # bincount and fresh constants would wait
    assert len(counts[0]) == 2  # once per pass: the loss and the confusion matrix read back


def test_the_counter_sees_every_kind_of_wait():
    x = torch.empty(4, device="meta")
    with HostWaits() as c:
        x.sum().item()
        bool(x[0])
        x.tolist()
        x.cpu()
        torch.ones(4).to("meta")
        torch.ones(4).to("meta", non_blocking=True)  # this one does not wait
        torch.tensor([1.0], device="meta")
        torch.bincount(x.long(), minlength=3)
        x.nonzero()
        torch.zeros(3).sum().item()  # on the host: no device involved
    assert len(c.waits) == 8, c.waits


# ------------------------------------------------------------------------ copies to the device

class CopyLog:
    """Stands in for Tensor.to and Tensor.pin_memory: records each call, moves nothing."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: self.calls.append(("to", a, k)) or t)
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: self.calls.append(("pin",)) or t)


def test_small_copies_go_pinned_and_non_blocking_to_cuda_and_blocking_to_mps(monkeypatch):
    log = CopyLog(monkeypatch)
    t = torch.arange(4)
    assert data.to_device(t, torch.device("cpu")) is t and log.calls == []
    data.to_device(t, torch.device("cuda", 1))
    assert log.calls == [("pin",), ("to", (torch.device("cuda", 1),), {"non_blocking": True})]
    log.calls.clear()
    data.to_device(t, torch.device("mps"))
    assert log.calls == [("to", (torch.device("mps"),), {})]  # pytorch/pytorch#139550


@pytest.mark.parametrize("device, non_blocking", [("mps", False), ("cuda", True)])
def test_the_data_set_is_copied_blocking_to_mps(monkeypatch, tmp_path, device, non_blocking):
    write_idx_set(str(tmp_path / "MNIST" / "raw"), n_train=64, n_test=32)
    cfg = load_config(None, [f"data.data_root={tmp_path}", "data.val_split=0.25"])
    log = CopyLog(monkeypatch)
    splits = data.load_data(cfg.data, 28, torch.device(device))
    assert len(splits.train) == 48 and len(log.calls) == 6  # train, val and test: images and labels
    assert all(k == {"non_blocking": non_blocking} for _, _, k in log.calls)


def test_random_erasing_on_the_cpu_draws_what_it_always_drew():
    """On the CPU, erasing gives exactly what the rule below gives with the batch's generator: a
    mask of the rectangles made on the host, noise drawn after the five uniform draws."""
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    gen = augment.batch_generator(3, 1, 5)
    out = augment.random_erasing(x[16:48], 0.5, gen, 16, 64)
    gen = augment.batch_generator(3, 1, 5)  # the rule, drawn again
    draws = torch.rand(5, 64, generator=gen)[:, 16:48]
    noise = torch.randint(0, 256, (64, 3, 32, 32), generator=gen, dtype=torch.uint8)[16:48]
    area = (0.02 + draws[0] * (1 / 3 - 0.02)) * 1024
    ratio = torch.exp(torch.log(torch.tensor(0.3)) + draws[1] * (torch.log(torch.tensor(1 / 0.3))
                                                                  - torch.log(torch.tensor(0.3))))
    h, w = (area * ratio).sqrt().round().clamp(1, 32), (area / ratio).sqrt().round().clamp(1, 32)
    top, left = (draws[2] * (32 - h + 1)).floor(), (draws[3] * (32 - w + 1)).floor()
    r, c = torch.arange(32).view(1, 32, 1), torch.arange(32).view(1, 1, 32)
    box = ((r >= top.view(-1, 1, 1)) & (r < (top + h).view(-1, 1, 1)) & (c >= left.view(-1, 1, 1))
           & (c < (left + w).view(-1, 1, 1)) & (draws[4] < 0.5).view(-1, 1, 1))
    assert torch.equal(out, torch.where(box.unsqueeze(1), noise, x[16:48]))
    assert 8 < int(box.flatten(1).any(1).sum()) < 24


# --------------------------------------------------------------- processes, GPUs and NCCL errors

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that reports 2 CUDA GPUs; the calls that would touch them are recorded."""
    seen = {"set_device": [], "group": None}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen["set_device"].append(d))
    monkeypatch.setattr(launch, "group_store", lambda *a: "store")
    monkeypatch.setattr(launch.dist, "init_process_group", lambda backend, **kw: seen.update(group=(backend, kw)))
    monkeypatch.setattr(sys, "platform", "linux")
    yield seen
    launch._GROUP.clear()


def launcher_env(monkeypatch, local_rank, local_world):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))


def test_more_processes_than_gpus_stop_before_the_group_starts(two_gpus, monkeypatch):
    cfg = load_config(None, [])
    launcher_env(monkeypatch, 0, 3)
    with pytest.raises(UserError) as e:
        launch.init_distributed(cfg, torch.device("cuda", 0), 0, 3)
    msg = str(e.value)
    assert "3 processes" in msg and "2 CUDA GPU(s)" in msg and "--nproc_per_node 2" in msg and "train.device=cpu" in msg
    assert two_gpus["group"] is None and two_gpus["set_device"] == []
    launcher_env(monkeypatch, 2, 1)  # LOCAL_WORLD_SIZE unset or wrong: the local rank still tells
    with pytest.raises(UserError, match="3 processes"):
        launch.init_distributed(cfg, torch.device("cuda", 0), 2, 3)
    launcher_env(monkeypatch, 1, 3)  # gloo does not mind two ranks on one GPU
    launch.init_distributed(load_config(None, ["distributed.backend=gloo"]), torch.device("cuda", 1), 1, 3)
    assert two_gpus["group"][0] == "gloo" and "device_id" not in two_gpus["group"][1]


def test_one_process_per_gpu_binds_each_rank_to_its_gpu(two_gpus, monkeypatch):
    launcher_env(monkeypatch, 1, 2)
    device = utils.resolve_device("auto", local_rank=1)
    launch.init_distributed(load_config(None, []), device, 1, 2)
    assert device == torch.device("cuda", 1) and two_gpus["set_device"] == [device]
    backend, kw = two_gpus["group"]
    assert backend == "nccl" and kw["device_id"] == device and kw["rank"] == 1 and kw["world_size"] == 2
    assert utils.resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)  # local_rank % device_count


def test_torchrun_with_more_processes_than_gpus_is_one_line(two_gpus, monkeypatch, capsys):
    launcher_env(monkeypatch, 0, 4)
    for k, v in {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    assert train.main(["train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--nproc_per_node 2" in err
    assert two_gpus["group"] is None


def test_device_choice_without_cuda_or_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert utils.resolve_device("auto") == torch.device("mps")
    assert utils.resolve_device("auto", no_mps=True) == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        utils.resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="MPS is not available"):
        utils.resolve_device("mps")


@pytest.mark.parametrize("message, lost", [
    ("NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:317, unhandled system error (run with "
     "NCCL_DEBUG=INFO for details), NCCL version 2.27.3", True),
    ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=41, OpType=ALLREDUCE, NumelIn=3) "
     "ran for 300000 milliseconds before timing out.", True),
    ("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, invalid usage (run with "
     "NCCL_DEBUG=WARN for details), NCCL version 2.27.3\nncclInvalidUsage: This usually reflects invalid usage "
     "of NCCL library.\nLast error:\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000", False),
])
def test_nccl_errors_lost_peer_or_own_cause(message, lost):
    dist_error = getattr(torch.distributed, "DistBackendError", RuntimeError)
    for error in (dist_error(message), RuntimeError(message)):
        assert launch.lost_peer(error, 2) is lost
        assert not launch.lost_peer(error, 1)


# ------------------------------------------------------------------------------------ CUDA set-up

@pytest.fixture
def cuda_switches(monkeypatch):
    """Stand-ins for torch.backends' CUDA switches, as torch >= 2.9 has them; restored afterwards."""
    matmul = types.SimpleNamespace(fp32_precision="ieee")
    cudnn = types.SimpleNamespace(benchmark=False, conv=types.SimpleNamespace(fp32_precision="ieee"))
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    return matmul, cudnn


def test_setup_turns_on_tf32_and_cudnn_autotuning_for_cuda_only(cuda_switches, monkeypatch):
    matmul, cudnn = cuda_switches
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = train.parse_args([])
    train.setup(load_config(None, ["train.device=cpu"]), args, 0, 1, 0)
    assert (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.benchmark) == ("ieee", "ieee", False)
    device, _ = train.setup(load_config(None, ["train.device=cuda"]), args, 0, 1, 0)
    assert device.type == "cuda"
    assert (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.benchmark) == ("tf32", "tf32", True)
    train.setup(load_config(None, ["train.device=cuda", "train.tf32=false"]), args, 0, 1, 0)
    assert (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.benchmark) == ("ieee", "ieee", True)


def test_tf32_on_a_torch_without_fp32_precision(monkeypatch):
    matmul = types.SimpleNamespace(allow_tf32=False)
    cudnn = types.SimpleNamespace(benchmark=False, allow_tf32=False)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    utils.configure_cuda(torch.device("cuda", 0), True)
    assert matmul.allow_tf32 and cudnn.allow_tf32 and cudnn.benchmark


def test_cuda_and_mps_rng_states_are_saved_and_restored(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: calls.append(("get", d)) or torch.arange(3))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", s.tolist(), d)))
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.arange(2))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: calls.append(("mps", s.tolist())))
    gpu = torch.device("cuda", 1)
    torch.manual_seed(5)
    state = checkpoint.get_rng_state(gpu)
    assert torch.equal(state["cuda"], torch.arange(3)) and "mps" not in state
    before = torch.rand(2)
    checkpoint.set_rng_state(state, gpu)
    assert calls == [("get", gpu), ("set", [0, 1, 2], gpu)] and torch.equal(torch.rand(2), before)
    checkpoint.set_rng_state(state, torch.device("mps"))  # written on CUDA, resumed on MPS: only the host RNGs
    mps_state = checkpoint.get_rng_state(torch.device("mps"))
    checkpoint.set_rng_state(mps_state, torch.device("mps"))
    assert "cuda" not in mps_state and calls[2:] == [("mps", [0, 1])]
    checkpoint.set_rng_state(mps_state, gpu)  # and the other way
    assert len(calls) == 3


def test_compile_is_off_on_mps_and_a_note_on_the_cpu(monkeypatch, caplog):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(kw) or m)
    tcfg = load_config(None, ["train.compile=true", "train.compile_backend=aot_eager"]).train
    logger = logging.getLogger("compile-test")
    raw = torch.nn.Linear(2, 2)
    for device in ("mps", "cpu", "cuda"):
        ctx = types.SimpleNamespace(device=torch.device(device), logger=logger, rank=0)
        with caplog.at_level(logging.INFO, logger="compile-test"):
            assert train.compiled(raw, tcfg, ctx) is raw
    assert compiled == [{"backend": "aot_eager"}] * 2  # CPU and CUDA, not MPS
    text = caplog.text
    assert "train.compile is off on MPS" in text and "train.compile on the CPU" in text and text.count("\n") == 2


# --------------------------------------------------- fused AdamW and the fp16 scaler across a resume

def tiny_training(tmp_path, monkeypatch, fused, *overrides):
    """(cfg, ctx, Training) of a tiny CPU run, with build_optimizer choosing fused AdamW or not, as it
    would on CUDA or on the CPU."""
    monkeypatch.setattr(train, "fused_adam", lambda device: fused)
    cfg = load_config(None, [f"checkpoint.dir={tmp_path}/ckpt", f"log.dir={tmp_path}/logs", "train.device=cpu",
                             "model.dim=32", "model.depth=2", "model.heads=2", *overrides])
    info = DataInfo("mnist", [str(i) for i in range(10)], (0.1307,), (0.3081,), 1, True, 28)
    ctx = train.RunCtx(cfg, torch.device("cpu"), 0, 1, info, train.amp_dtype_for(cfg.train.amp, torch.device("cpu")),
                       10, logging.getLogger("test"))
    return cfg, ctx, train.build_training(cfg, ctx, dict(TINY_VIT))


def fp16_steps(t, ctx, n):
    """n optimizer steps under autocast with the grad scaler and clipping, as forward_backward runs them."""
    torch.manual_seed(0)
    for _ in range(n):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        train.forward_backward(t, x, y, 1.0, ctx, True)
        train.optimizer_step(t, ctx.cfg.train)


def save_and_resume(tmp_path, monkeypatch, written, resumed, caplog=None):
    """Train 3 steps with `written` = (fused, amp), save, then resume under `resumed`. Returns the
    resumed Training and its context."""
    cfg, ctx, t = tiny_training(tmp_path, monkeypatch, written[0], f"train.amp={written[1]}")
    fp16_steps(t, ctx, 3)
    run = RunDir("t", str(tmp_path / "ckpt"), str(tmp_path / "logs"), True, True)
    Checkpointer(cfg, ctx, dict(TINY_VIT), run).end_of_epoch(t, TrainState(epoch=1), False, last=True)
    cfg, ctx, t = tiny_training(tmp_path, monkeypatch, resumed[0], f"train.amp={resumed[1]}",
                                "checkpoint.resume=true")
    assert Checkpointer(cfg, ctx, dict(TINY_VIT), run).resume(t, TrainState()).endswith("epoch_001.pt")
    return t, ctx


@pytest.mark.parametrize("written, resumed", [(False, True), (True, False)])
def test_resume_on_another_device_keeps_this_devices_optimizer(tmp_path, monkeypatch, written, resumed):
    """A CPU checkpoint (unfused) resumed on CUDA (fused), and the other way, with the fp16 scaler:
    the optimizer runs as build_optimizer chose here, its step counts where that one keeps them."""
    t, ctx = save_and_resume(tmp_path, monkeypatch, (written, "fp16"), (resumed, "fp16"))
    assert all(g["fused"] is (True if resumed else None) for g in t.optimizer.param_groups)
    steps = [s["step"] for s in t.optimizer.state.values()]
    assert steps and all(s.item() == 3 and s.dtype == torch.float32 for s in steps)
    before = t.raw.head.weight.clone()
    fp16_steps(t, ctx, 2)  # an unfused AdamW handed the scaler's grad_scale would fail here
    assert all(s.item() == 5 for s in steps) and not torch.equal(before, t.raw.head.weight)


def test_turning_fp16_on_at_resume_starts_the_scaler_fresh(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="test"):
        t, ctx = save_and_resume(tmp_path, monkeypatch, (False, "off"), (False, "fp16"))
    assert t.scaler.is_enabled() and "grad scaler starts fresh" in caplog.text
    fp16_steps(t, ctx, 1)
    assert t.scaler.get_scale() == 65536.0  # a fresh scaler's scale, not a loaded one


# ------------------------------------------------------------------- bench: compiling off the clock

def test_time_to_accuracy_leaves_compiling_off_the_clock(tmp_path, monkeypatch):
    """A stand-in compile that costs 2 s once per process, like torch.compile's cache: the time to
    accuracy must not contain it, and reports it as compile_s."""
    paid = []

    class Compiled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            if not paid:
                paid.append(time.sleep(2.0))
            return self.m(x)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: Compiled(m))
    write_idx_set(str(tmp_path / "data" / "MNIST" / "raw"), n_train=128, n_test=64)
    cfg = load_config(None, [f"data.data_root={tmp_path}/data", "train.device=cpu", "train.compile=true",
                             "model.dim=32", "model.depth=2", "model.heads=2", "train.batch_size=32"])
    args = bench.parse_args(["--eval-images", "64"])
    pipe = bench.setup_ours(cfg, args, torch.device("cpu"), bench.Clock(torch.device("cpu")))
    spent, acc, curve, extra = pipe.time_to_acc(0.0, 0)
    assert extra["compile_s"] >= 2.0 and spent < 2.0 and len(curve) == 1 and paid


# ------------------------------------------------------------------------- training runs (slow)

class StopAfter(train.StopSignal):
    """Acts as if SIGTERM arrived just before the n-th stop check."""
    n = 0

    def __init__(self):
        super().__init__()
        self.calls = 0

    def agreed(self, device, world):
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_fp16_with_the_scaler_and_clipping_resumes_bit_exact(tmp_path, mnist_root, monkeypatch, fused):
    """train.amp=fp16 on the CPU (autocast and torch.amp.GradScaler("cpu")), grad clipping on, with
    the unfused loop and with fused AdamW (the scaler then hands it grad_scale and found_inf, as on
    CUDA): stopped mid-epoch 2 and resumed, it ends with the same weights as a run never stopped."""
    monkeypatch.setattr(train, "fused_adam", lambda device: fused)
    extra = ("train.epochs=2", "train.amp=fp16", "train.grad_clip=0.5", "model.dropout=0.1")
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(small_run_args(a, mnist_root, *extra)) == 0
    StopAfter.n = 21 + 7
    monkeypatch.setattr(train, "StopSignal", StopAfter)
    assert train.main(small_run_args(b, mnist_root, *extra)) == 0
    monkeypatch.setattr(train, "StopSignal", launch.StopSignal)
    assert train.main(small_run_args(b, mnist_root, *extra, "checkpoint.resume=true")) == 0
    ma, mb = read_metrics(a / "logs" / RUN), read_metrics(b / "logs" / RUN)
    assert comparable(ma) == comparable(mb) and ma[-1]["val_acc"] > 0.8
    wa, wb = (checkpoint.load_checkpoint(str(d / "ckpt" / RUN / "epoch_002.pt")) for d in (a, b))
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert wa["scaler"]["scale"] == wb["scaler"]["scale"] > 0 and wa["scaler"] == wb["scaler"]
    assert all(g["fused"] is (True if fused else None) for g in wb["optimizer"]["param_groups"])


@pytest.mark.slow
def test_compiled_model_under_ddp_with_no_sync_and_ema(tmp_path, mnist_root):
    """torch.compile (aot_eager: the compiled path without code generation) on 2 CPU ranks with
    grad_accum 2 (DDP's no_sync on the first micro-batch) and EMA: the same run as one eager process
    with the same global batch, up to floating-point order."""
    common = ("train.epochs=1", "train.grad_accum=2", "train.ema=true", "train.ema_decay=0.9")
    env = {"OMP_NUM_THREADS": "1"}
    ref = run_cli(["train.py"] + small_run_args(tmp_path / "eager", mnist_root, *common), env=env)
    assert ref.returncode == 0, ref.stderr
    two = run_cli(["train.py", "--num-gpus", "2"] + small_run_args(
        tmp_path / "compiled", mnist_root, *common, "train.batch_size=16", "train.compile=true",
        "train.compile_backend=aot_eager"), env=env)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "train.compile on the CPU" in two.stdout and "world size 2" in two.stdout
    got, want = read_metrics(tmp_path / "compiled" / "logs" / RUN), read_metrics(tmp_path / "eager" / "logs" / RUN)
    for key in ("train_loss", "val_loss", "ema_val_loss", "lr"):
        assert got[0][key] == pytest.approx(want[0][key], rel=1e-4, abs=1e-6), key
    assert got[0]["world_size"] == 2 and abs(got[0]["ema_val_acc"] - want[0]["ema_val_acc"]) <= 0.01


# ------------------------------------------------------------------- on a GPU: pytest -m cuda

@cuda_test
@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p) if p else "config.yaml")
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_cuda_training_steps_never_synchronize(path, amp):
    """On the GPU, counted by CUDA itself: no synchronising call per step, in bf16 and in fp16 with
    the grad scaler. SGD (the ResNet preset) is not fused, so under fp16 the scaler reads its inf
    check back: one per step."""
    device = torch.device("cuda", 0)
    utils.configure_cuda(device, True)
    allowed = 1 if amp == "fp16" and load_config(path, []).train.optimizer == "sgd" else 0
    assert gpu_suite.syncs_per_step(path, device, amp) <= allowed


@cuda_test
def test_cuda_erasing_noise_is_reproducible_and_a_slice_matches_the_global_batch():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    whole = augment.random_erasing(x, 1.0, augment.batch_generator(0, 1, 0), 0, 64)
    again = augment.random_erasing(x, 1.0, augment.batch_generator(0, 1, 0), 0, 64)
    half = augment.random_erasing(x[32:], 1.0, augment.batch_generator(0, 1, 0), 32, 64)
    assert torch.equal(whole, again) and torch.equal(whole[32:], half) and not torch.equal(whole, x)

