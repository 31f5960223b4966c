"""The GPU suite: what a first run on one CUDA GPU has to show, in one command, in minutes.

    python bench.py --suite gpu

Needs a CUDA build of torch (and torchvision), omegaconf, numpy, pillow and matplotlib; nothing
is downloaded: MNIST ships in data/MNIST/raw, CIFAR-10 is stood in for by random images written in
its pickle format. Each piece runs on its own, with a time limit; a piece that fails or runs out
of time is recorded as failed and the suite goes on. The report goes to
results/gpu/<device>-<YYYY-MM-DD>.json and a markdown table beside it (docs/gpu.md).

The pieces whose point is the command line (train.py, --num-gpus, torchrun, --eval, infer.py,
SIGTERM and resume, bench.py's time to accuracy) run as subprocesses; throughput, host syncs and
MFU are measured in this process with train.py's own functions.
"""
import datetime
import json
import logging
import os
import pickle
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace

import numpy as np
import torch

import bench
import train
from checkpoint import TrainState
from data import DATASETS, DataInfo, Split, flip_choice
from model import build_model
from utils import UserError, configure_cuda, load_config

ROOT = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(ROOT, "results", "gpu")
BUDGET_S = 420  # the whole suite: a piece that would not fit is skipped, a command is cut off 30 s past it
PRESETS = ["configs/mnist.yaml", "configs/mnist_fast.yaml", "configs/fashion_mnist.yaml",
           "configs/cifar10_vit.yaml", "configs/cifar10_resnet.yaml"]
CIFAR_PRESETS = ["configs/cifar10_vit.yaml", "configs/cifar10_resnet.yaml"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
TIMING_KEYS = {"epoch_time_s", "images_per_s", "eval_time_s"}
# CUDA runs are not bit-exact (atomics in attention's backward, autotuned kernels): runs that should be
# the same are compared within these
SAME_ACC, SAME_LOSS = 0.004, 0.01


# ----------------------------------------------------------------------------------- helpers

def device_slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the device's part of a report's file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def write_cifar(folder, per_batch=1024, n_test=1000, seed=0):
    """Random images and labels in CIFAR-10's python format (5 training batches, a test batch and
    batches.meta, pickled dicts with bytes keys), which data.load_raw("cifar10") reads as the real one."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f, protocol=2)
    return folder


def start(argv):
    """A command of the toolkit, started in the repository without launcher variables, its output
    piped, in a process group of its own (so that a timeout ends torchrun's workers too)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def cli(argv, timeout):
    """Run a command of the toolkit; never raises: (exit code or None on timeout, seconds, output)."""
    t0 = time.perf_counter()
    proc = start(argv)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    return code, round(time.perf_counter() - t0, 1), out or ""


def tail(text, n=600):
    return text[-n:].strip()


def metrics(log_dir):
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def same_run(got, want):
    """(bit-identical, within tolerance, the largest differences) of two metrics.jsonl histories."""
    strip = [[{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs] for rs in (got, want)]
    if not got or len(got) != len(want):
        return False, False, {}
    d_acc = max(abs(a["val_acc"] - b["val_acc"]) for a, b in zip(got, want))
    d_loss = max(abs(a["train_loss"] - b["train_loss"]) / max(abs(b["train_loss"]), 1e-12) for a, b in zip(got, want))
    return strip[0] == strip[1], d_acc <= SAME_ACC and d_loss <= SAME_LOSS, {"max_d_val_acc": round(d_acc, 5),
                                                                           "max_rel_d_train_loss": round(d_loss, 5)}


# ------------------------------------------------------------------------- running the pieces

class Suite:
    """The pieces run so far, the clock, and the scratch folder."""

    def __init__(self, device, budget_s=BUDGET_S):
        self.device, self.budget_s, self.t0 = device, budget_s, time.perf_counter()
        self.work = tempfile.mkdtemp(prefix="gpu_suite_")
        self.pieces, self.shared = {}, {}

    def left(self):
        return self.budget_s - (time.perf_counter() - self.t0)

    def timeout(self, want):
        """A command's time limit: `want` seconds, cut to end at most 30 s past the suite's budget."""
        return max(10.0, min(want, self.left() + 30))

    def run(self, name, fn, needs_s):
        """fn(self) -> a dict with "ok" and what it measured. A piece that needs more than the time left
        is skipped; one that raises is a failure with its error."""
        if self.left() < needs_s:
            self.pieces[name] = {"ok": None, "summary": f"skipped: {self.left():.0f} s left, needs ~{needs_s} s"}
            return
        print(f"[gpu suite] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = fn(self)
        except Exception as e:  # a broken piece is a result, not the end of the suite
            result = {"ok": False, "summary": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        finally:
            torch.cuda.empty_cache()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        self.pieces[name] = result
        status = {True: "ok", False: "FAILED", None: "skipped"}[result.get("ok")]
        print(f"[gpu suite] {name}: {status} in {result['seconds']} s: {result.get('summary', '')}", file=sys.stderr,
              flush=True)

    def train_cli(self, name, *overrides, timeout=150, launcher=()):
        """train.py (behind `launcher`) on real MNIST into the scratch folder as run `name`:
        (exit code, seconds, output, metrics)."""
        argv = [*(launcher or [sys.executable]), "train.py", "train.device=cuda", f"run.name={name}",
                f"checkpoint.dir={self.work}/ckpt", f"log.dir={self.work}/logs", "log.tensorboard=false", *overrides]
        code, seconds, out = cli(argv, self.timeout(timeout))
        return code, seconds, out, metrics(os.path.join(self.work, "logs", name))


# ------------------------------------------------------------------------------------- pieces

def piece_environment(suite):
    props = torch.cuda.get_device_properties(suite.device)
    return {"ok": True, "summary": f"{props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}",
            "device": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "sm_count":
            props.multi_processor_count, "capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": sys.version.split()[0],
            "bf16": torch.cuda.is_bf16_supported()}


def piece_matmul_peak(suite, n=8192):
    """The bf16 matmul rate this GPU reaches (TFLOP/s), the denominator of MFU (bench.matmul_peak:
    the fastest of 5 timed runs of about 0.2 s)."""
    tflops = bench.matmul_peak(suite.device, torch.bfloat16, n=n) / 1e12
    suite.shared["peak_tflops"] = tflops
    return {"ok": tflops > 0, "summary": f"{tflops:.1f} TFLOP/s bf16 ({n}^3 matmul)", "tflops": round(tflops, 1)}


def preset_training(path, device, *overrides):
    """(Training, ctx, split) of a preset (None: config.yaml) on `device` with 8 global batches of
    random images of its dataset's shape (on `meta`: shapes alone), for measuring its step."""
    cfg = load_config(path, ["train.compile=false", "train.log_interval=1000000", *overrides])
    ds = cfg.data.dataset
    if ds == "folder":  # a grey (or data.channels=3) folder of 10 classes at model.image_size
        channels = 3 if str(cfg.data.channels) == "3" else 1
        classes, mean, std, digit_style = tuple(map(str, range(10))), (0.5,) * channels, (0.25,) * channels, False
    else:
        _, classes, mean, std, channels, digit_style = DATASETS[ds]
    side = {"cifar10": 32, "folder": int(cfg.model.image_size)}.get(ds, 28)
    info = DataInfo(ds, classes, mean, std, channels, digit_style, side)
    info.hflip = flip_choice(cfg.data.hflip, info)
    n = 8 * cfg.train.batch_size
    split = Split(torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8).to(device),
                  torch.randint(0, len(classes), (n,)).to(device))
    ctx = train.RunCtx(cfg, device, 0, 1, info, train.amp_dtype_for(cfg.train.amp, device), 8,
                       logging.getLogger("gpu_suite"))
    margs = train.model_args_from_config(cfg.model, channels, len(classes))
    return train.build_training(cfg, ctx, margs), ctx, split


def cuda_syncs(t, ctx, split, first, last):
    """The synchronising calls CUDA's own check (set_sync_debug_mode) reports in train_one_epoch over
    steps first..last-1."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.train_one_epoch(t, split, replace(ctx, steps_per_epoch=last), replace(TrainState(), step=first),
                                  train.StopSignal())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def syncs_per_step(path, device, amp="auto"):
    """Synchronising calls per training step of a preset: steps 3..6 less steps 1..2, halved, after a
    warm-up step, so what an epoch does once drops out."""
    t, ctx, split = preset_training(path, device, f"train.amp={amp}")
    train.train_one_epoch(t, split, replace(ctx, steps_per_epoch=1), TrainState(), train.StopSignal())
    two, four = cuda_syncs(t, ctx, split, 1, 3), cuda_syncs(t, ctx, split, 3, 7)
    return (len(four) - len(two)) / 2


def piece_syncs(suite):
    """Host syncs per training step of every preset, in bf16 (amp auto) and fp16 with the scaler."""
    rows = []
    for path in [None] + PRESETS:
        row = {"preset": path or "config.yaml"}
        for amp in ("auto", "fp16"):
            row[f"syncs_per_step_{amp}"] = syncs_per_step(path, suite.device, amp)
        rows.append(row)
    # SGD (the ResNet preset) is not fused: under fp16 the scaler reads its inf check back once a step
    worst = max(max(r["syncs_per_step_auto"], r["syncs_per_step_fp16"]) for r in rows)
    return {"ok": worst <= 1, "summary": f"at most {worst:g} per step", "rows": rows}


MODES = {"fp32_tf32": ("train.amp=off",), "bf16": ("train.amp=bf16",),
         "bf16_compile": ("train.amp=bf16", "train.compile=true"), "fp16_scaler": ("train.amp=fp16",)}


def piece_mnist_epochs(suite):
    """One epoch of the default model on real MNIST in each precision, through train.py."""
    rows, ok = [], True
    for mode, overrides in MODES.items():
        code, seconds, out, m = suite.train_cli(f"mnist-{mode}", "train.epochs=1", *overrides, timeout=240)
        row = {"mode": mode, "exit": code, "wall_s": seconds}
        if m:
            row.update({k: m[-1][k] for k in ("val_acc", "train_loss", "images_per_s", "epoch_time_s", "eval_time_s")})
        if "compile" in mode:
            row["note"] = "the epoch's time includes compiling"
        good = code == 0 and m and m[-1]["val_acc"] > 0.9
        if not good:
            row["output"] = tail(out, 300)
        ok = ok and bool(good)
        rows.append(row)
    suite.shared["mnist_ips"] = {r["mode"]: r.get("images_per_s") for r in rows}
    summary = ", ".join(f"{r['mode']} {r.get('val_acc', 'failed')} ({r.get('images_per_s', '-')} img/s)" for r in rows)
    return {"ok": ok, "summary": summary, "rows": rows}


def piece_launchers(suite):
    """--num-gpus 1 and torchrun --nproc_per_node 1 give the plain bf16 run's metrics. With one GPU the
    world size is 1, so no NCCL group forms here (piece nccl_probe checks NCCL itself)."""
    want = metrics(os.path.join(suite.work, "logs", "mnist-bf16"))
    rows, ok = [], bool(want)
    for name, launcher in (("num_gpus_1", None), ("torchrun_1", (sys.executable, "-m", "torch.distributed.run",
                                                                  "--nproc_per_node", "1"))):
        extra = ("--num-gpus", "1") if launcher is None else ()
        code, seconds, out = cli([*(launcher or [sys.executable]), "train.py", *extra, "train.device=cuda",
                                  "train.amp=bf16", "train.epochs=1", f"run.name={name}", "log.tensorboard=false",
                                  f"checkpoint.dir={suite.work}/ckpt", f"log.dir={suite.work}/logs"],
                                 suite.timeout(240))
        identical, close, diffs = same_run(metrics(os.path.join(suite.work, "logs", name)), want)
        rows.append({"launcher": name, "exit": code, "wall_s": seconds, "identical": identical, "same": close,
                     **diffs, **({} if code == 0 else {"output": tail(out, 300)})})
        ok = ok and code == 0 and close
    return {"ok": ok, "summary": "; ".join(f"{r['launcher']}: {'same' if r['same'] else 'DIFFERENT'} metrics"
                                           f"{' (bit-identical)' if r['identical'] else ''}" for r in rows),
            "rows": rows}


def piece_eval_and_infer(suite):
    """train.py --eval and infer.py on CUDA with the bf16 run's final weights."""
    final = os.path.join(suite.work, "ckpt", "mnist-bf16", "mnist_transformer_final.pth")
    want = metrics(os.path.join(suite.work, "logs", "mnist-bf16"))
    code, seconds, out = cli([sys.executable, "train.py", "--eval", "--checkpoint", final, "train.device=cuda",
                              "train.amp=bf16"], suite.timeout(120))
    found = re.search(r"Global Accuracy: ([\d.]+)%", out)
    acc = float(found.group(1)) if found else None
    eval_ok = code == 0 and acc is not None and bool(want) and abs(acc - 100 * want[-1]["val_acc"]) <= 100 * SAME_ACC
    code_i, seconds_i, out_i = cli([sys.executable, "infer.py", "--checkpoint", final, "--device", "cuda", "--json",
                                    "--no-show", "--output", os.path.join(suite.work, "outputs")], suite.timeout(120))
    try:
        preds = json.loads(out_i.strip().splitlines()[-1])
        right = sum(r["label"] == os.path.basename(r["file"])[0] for r in preds)
    except (ValueError, IndexError, KeyError, TypeError):
        preds, right = [], 0
    infer_ok = code_i == 0 and len(preds) > 0 and right >= len(preds) // 2
    return {"ok": eval_ok and infer_ok, "summary": f"--eval {acc}% (training's last val_acc "
            f"{round(100 * want[-1]['val_acc'], 2) if want else '-'}%); infer.py {right}/{len(preds)} right",
            "rows": [{"command": "train.py --eval", "exit": code, "wall_s": seconds, "accuracy_pct": acc},
                     {"command": "infer.py --json", "exit": code_i, "wall_s": seconds_i, "right": right,
                      "images": len(preds)}],
            **({} if eval_ok and infer_ok else {"output": tail(out + out_i)})}


def sigterm_mid_run(suite, name, overrides):
    """train.py with `overrides`, SIGTERM as soon as its first epoch is logged: (exit code, output)."""
    argv = [sys.executable, "train.py", "train.device=cuda", f"run.name={name}", "log.tensorboard=false",
            f"checkpoint.dir={suite.work}/ckpt", f"log.dir={suite.work}/logs", *overrides]
    proc = start(argv)
    deadline = time.monotonic() + suite.timeout(150)
    while not metrics(os.path.join(suite.work, "logs", name)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=suite.timeout(120))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return proc.returncode, out


def piece_sigterm_resume(suite):
    """SIGTERM during epoch 2 of a 2-epoch run, resume, and compare with the run never stopped."""
    overrides = ("train.epochs=2", "data.train_limit=20000", "train.amp=bf16")
    code_s, _, out_s, want = suite.train_cli("straight", *overrides, timeout=180)
    code_i, out_i = sigterm_mid_run(suite, "stopped", overrides)
    stopped = re.search(r"stopped by signal (?:at epoch \d+, step \d+/\d+|after epoch \d+)", out_i)
    code_r, _, out_r, got = suite.train_cli("stopped", *overrides, "checkpoint.resume=true", timeout=180)
    identical, close, diffs = same_run(got, want)
    ok = code_s == 0 and code_i == 0 and bool(stopped) and code_r == 0 and close
    return {"ok": ok, "summary": f"{stopped.group(0) if stopped else 'no stop line'}; resumed run "
            f"{'the same as' if close else 'DIFFERENT from'} the straight one{' (bit-identical)' if identical else ''}",
            "exits": [code_s, code_i, code_r], **diffs,
            **({} if ok else {"output": tail(out_s + out_i + out_r, 900)})}


def piece_time_to_99(suite):
    """bench.py's time to 99% test accuracy with configs/mnist_fast.yaml; compiling is reported apart."""
    code, seconds, out = cli([sys.executable, "bench.py", "--config", "configs/mnist_fast.yaml", "--target-acc",
                              "0.99", "--max-train-s", "150", "--windows", "3", "--warmup-steps", "5",
                              "train.device=cuda"], suite.timeout(330))
    records = {}
    for line in out.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            records[rec["metric"]] = rec
    tta, speed = records.get("time_to_0.99_s", {}), records.get("train_images_per_s", {})
    ok = code == 0 and bool(tta.get("reached"))
    reached = "99% after" if ok else f"99% NOT reached ({tta.get('final_acc', '-')}) in"
    return {"ok": ok, "summary": f"{reached} {tta.get('train_s', '-')} s of training (compiling "
            f"{tta.get('compile_s', '-')} s apart), {speed.get('value', '-')} img/s",
            "time_to_99_s": tta.get("value"), "train_s": tta.get("train_s"), "compile_s": tta.get("compile_s"),
            "final_acc": tta.get("final_acc"), "curve_s_acc": tta.get("curve_s_acc"),
            "train_images_per_s": speed.get("value"), "wall_s": seconds,
            **({} if ok else {"output": tail(out, 900)})}


def model_flops(cfg, in_channels, num_classes, batch=4):
    """Model FLOPs of one image's forward and backward (bench.flops_per_image, on the meta device)."""
    model = build_model(train.model_args_from_config(cfg.model, in_channels, num_classes)).to("meta")
    x = torch.empty(batch, in_channels, cfg.model.image_size, cfg.model.image_size, device="meta")
    return bench.flops_per_image(lambda: model(x).sum().backward(), batch)


def preset_throughput(suite, path, root):
    """Training and evaluation images/s of a preset on its data folder, measured as bench.py does."""
    cfg = load_config(path, [f"data.data_root={root}", "data.download=false", "train.device=cuda"])
    args = bench.parse_args(["--eval-images", "0"])
    clock = bench.Clock(suite.device)
    pipe = bench.setup_ours(cfg, args, suite.device, clock)
    bench.warm_up(pipe, 10)
    train_s = bench.interleaved_seconds([lambda: pipe.train_steps(pipe.window_steps)], clock, 5)[0]
    eval_s = bench.interleaved_seconds([pipe.evaluate], clock, 3)[0]
    ips = statistics.median(pipe.window_steps * pipe.batch / s for s in train_s)
    eval_ips = statistics.median(pipe.eval_images / s for s in eval_s)
    evals = 2 if cfg.train.ema else 1
    minutes = cfg.train.epochs * (50000 / ips + evals * 10000 / eval_ips) / 60  # CIFAR-10: 50k train, 10k test
    flops = pipe.flops["train"]  # bench counted one real training step's forward and backward
    peak = suite.shared.get("peak_tflops")
    return {"preset": path, "batch": cfg.train.batch_size, "amp": pipe.summary["amp"], "compile": cfg.train.compile,
            "train_images_per_s": round(ips, 1), "eval_images_per_s": round(eval_ips, 1), "epochs": cfg.train.epochs,
            "projected_min": round(minutes, 1), "gflops_per_image": round(flops / 1e9, 3),
            "mfu_pct": round(100 * flops * ips / (peak * 1e12), 2) if peak else None,
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated(suite.device) / 2**20)}


def piece_cifar_presets(suite):
    """The CIFAR-10 presets' throughput on random CIFAR-format data, their full schedules projected."""
    root = os.path.join(suite.work, "cifar")
    write_cifar(os.path.join(root, "cifar-10-batches-py"))
    rows = []
    for path in CIFAR_PRESETS:
        torch.cuda.reset_peak_memory_stats(suite.device)
        rows.append(preset_throughput(suite, path, root))
    summary = "; ".join(f"{os.path.basename(r['preset'])}: {r['train_images_per_s']:.0f} img/s, "
                        f"{r['projected_min']} min for {r['epochs']} epochs, MFU {r['mfu_pct']}%" for r in rows)
    return {"ok": all(r["train_images_per_s"] > 0 for r in rows), "rows": rows, "summary": summary}


def piece_mnist_mfu(suite):
    """MFU of the default model's one-epoch runs (their images/s from piece mnist_epochs)."""
    cfg, peak = load_config(None, []), suite.shared.get("peak_tflops")
    flops = model_flops(cfg, 1, 10)
    rows = [{"mode": mode, "images_per_s": ips, "gflops_per_image": round(flops / 1e9, 4),
             "mfu_pct": round(100 * flops * ips / (peak * 1e12), 3) if ips and peak else None}
            for mode, ips in suite.shared.get("mnist_ips", {}).items()]
    return {"ok": bool(rows) and all(r["mfu_pct"] is not None for r in rows), "rows": rows,
            "summary": ", ".join(f"{r['mode']} {r['mfu_pct']}%" for r in rows) or "no MNIST epochs measured"}


def piece_too_many_processes(suite):
    """torchrun with one process more than there are GPUs: one line naming the fix, not NCCL's error."""
    n = torch.cuda.device_count() + 1
    code, seconds, out = cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "train.py",
                              "train.device=cuda", "train.epochs=1", "data.train_limit=640", "log.tensorboard=false",
                              f"checkpoint.dir={suite.work}/ckpt", f"log.dir={suite.work}/logs", "run.name=dup"],
                             suite.timeout(120))
    named = "NCCL needs one GPU per process" in out and f"--nproc_per_node {n - 1}" in out
    ok = code not in (0, None) and named and "Duplicate GPU detected" not in out
    return {"ok": ok, "summary": f"exit {code}; {'names the fix' if named else 'does NOT name the fix'}",
            "wall_s": seconds, **({} if ok else {"output": tail(out, 900)})}


NCCL_PROBE = """
import datetime, torch, torch.distributed as dist
d = torch.device("cuda", 0)
torch.cuda.set_device(d)
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=d,
                        timeout=datetime.timedelta(seconds=60))
t = torch.ones(3, device=d)
dist.all_reduce(t)
box, out = [{"a": 1}], [None]
dist.broadcast_object_list(box, src=0)
dist.all_gather_object(out, {"rank": 0})
dist.barrier()
dist.destroy_process_group()
print("nccl ok", t.tolist(), box, out, torch.cuda.nccl.version())
"""


def piece_nccl_probe(suite):
    """NCCL itself, in a group of one bound to the GPU: all_reduce and the object collectives."""
    code, seconds, out = cli([sys.executable, "-c", NCCL_PROBE], suite.timeout(90))
    ok = code == 0 and "nccl ok" in out
    return {"ok": ok, "summary": tail(out, 200).splitlines()[-1] if out.strip() else f"exit {code}",
            "wall_s": seconds}


def piece_cuda_tests(suite):
    """The tests marked `cuda` (pytest -m cuda), where pytest is installed."""
    code, seconds, out = cli([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                              "tests/test_gpu_paths.py"], suite.timeout(240))
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return {"ok": code == 0, "summary": last[:200], "wall_s": seconds, **({} if code == 0 else {"output": tail(out)})}


# ------------------------------------------------------------------------------------- report

# (name, function, the seconds it needs to be started): in order of what matters most
PIECES = [("environment", piece_environment, 5), ("matmul_peak", piece_matmul_peak, 10),
          ("syncs", piece_syncs, 30), ("mnist_epochs", piece_mnist_epochs, 100),
          ("mnist_mfu", piece_mnist_mfu, 5), ("eval_and_infer", piece_eval_and_infer, 25),
          ("launchers", piece_launchers, 45), ("too_many_processes", piece_too_many_processes, 20),
          ("nccl_probe", piece_nccl_probe, 10), ("sigterm_resume", piece_sigterm_resume, 45),
          ("cifar_presets", piece_cifar_presets, 30), ("time_to_99", piece_time_to_99, 60),
          ("cuda_tests", piece_cuda_tests, 60)]


def markdown(report):
    """The report as markdown: the status of every piece, then a table per piece that has rows."""
    env = report["pieces"].get("environment", {})
    lines = [f"# GPU suite: {report['device']}, {report['date']}", "",
             f"torch {env.get('torch', '-')}, CUDA {env.get('cuda', '-')}, {report['passed']} passed, "
             f"{report['failed']} failed, {report['skipped']} skipped, {report['total_s']} s in all.", "",
             "| piece | status | s | result |", "| --- | --- | --- | --- |"]
    for name, p in report["pieces"].items():
        status = {True: "ok", False: "**FAILED**", None: "skipped"}[p.get("ok")]
        lines.append(f"| {name} | {status} | {p.get('seconds', '-')} | {_cell(p.get('summary', ''))} |")
    for name, p in report["pieces"].items():
        if p.get("rows"):
            cols = list(dict.fromkeys(k for r in p["rows"] for k in r if k != "output"))
            lines += ["", f"## {name}", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in p["rows"]]
    return "\n".join(lines) + "\n"


def _cell(value):
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_report(report, out_dir):
    """results/gpu/<device>-<date>.json and .md; returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{report['slug']}-{report['date']}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    with open(base + ".md", "w") as f:
        f.write(markdown(report))
    return base + ".json", base + ".md"


def make_report(device_name, pieces, total_s, date=None):
    oks = [p.get("ok") for p in pieces.values()]
    return {"suite": "gpu", "device": device_name, "slug": device_slug(device_name),
            "date": date or datetime.date.today().isoformat(), "total_s": round(total_s, 1),
            "passed": oks.count(True), "failed": oks.count(False), "skipped": oks.count(None), "pieces": pieces}


def run_suite(args=None, out_dir=RESULTS):
    """bench.py --suite gpu. Exit code 0 when every piece that ran passed, 1 otherwise."""
    if not torch.cuda.is_available():
        raise UserError("the GPU suite needs a CUDA GPU; torch sees none here (torch.cuda.is_available() is False): "
                        "run it on a machine with one and a CUDA build of torch (docs/gpu.md)", code=2)
    device = torch.device("cuda", 0)
    configure_cuda(device, True)
    suite = Suite(device)
    try:
        for name, fn, needs_s in PIECES:
            suite.run(name, fn, needs_s)
    finally:
        shutil.rmtree(suite.work, ignore_errors=True)
    report = make_report(torch.cuda.get_device_name(device), suite.pieces, time.perf_counter() - suite.t0)
    paths = write_report(report, out_dir)
    print(markdown(report))
    print(f"report: {paths[0]} and {paths[1]}")
    return 0 if report["failed"] == 0 else 1
