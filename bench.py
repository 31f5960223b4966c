"""Measure training speed, evaluation speed, memory and time to accuracy for any config.

    python bench.py [--config FILE] [key.sub=value ...]                  our pipeline
    python bench.py --baseline [...]                                      and a DataLoader baseline, side by side
    python bench.py --target-acc 0.98 --max-train-s 900 [--baseline] [...]
    python bench.py --suite gpu                                           the GPU suite (gpu_suite.py, docs/gpu.md)

Our pipeline is train.py's own code: load_data, build_training, train_one_epoch and evaluate,
called with the config's settings. The baseline is the usual tutorial pipeline at the same model
dims (or, with --baseline-dims tutorial, a typical tutorial ViT's): torchvision per-sample
transforms (ToTensor, Normalize) on a Dataset of PIL images, a DataLoader (batch 64, shuffle,
main-process loading by default), a ViT built from nn.TransformerEncoder (batch_first, pre-norm),
Adam 1e-3 and a per-epoch cosine over 5 epochs, with a loss.item() per step for its running loss.
Both read the same files through data.py's parser, so nothing is downloaded.

Each measurement is one JSON line on stdout; a table with the ratios ours/baseline goes to stderr
at the end. Throughput is the median of --windows timed windows after --warmup-steps untimed
steps; with --baseline the two pipelines take turns window by window, so a change in the
machine's load hits both. CUDA work is synchronized before every clock read. Evaluation passes
never count as training time.
"""
import os

# Before torch loads OpenMP: an idle OpenMP thread spins for a short while, then sleeps, so a run that
# shares its cores with other work (another run) slows down in proportion, not several-fold (docs/bench.md).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

import train
from baseline import (Baseline, baseline_dims, baseline_eval, baseline_loaders, baseline_stepper, baseline_summary,
                      baseline_time_to_acc)
from checkpoint import TrainState
from data import Split, load_data, load_raw, normalize
from launch import StopSignal
from model import model_args_from_config
from utils import UserError, configure_cuda, exit_with, load_config, resolve_device, user_errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark training and evaluation speed, memory and time to accuracy. "
                                "Config keys are overridden as key.sub=value after the flags, as for train.py.")
    p.add_argument("--config", default=None, help="YAML layered on config.yaml (default: config.yaml alone)")
    p.add_argument("--baseline", "--reference", action="store_true",
                   help="also run the DataLoader baseline and print the ratios ours/baseline")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported (default: 5)")
    p.add_argument("--window-steps", type=int, default=20, help="training steps per timed window (default: 20)")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps before the windows (default: 10)")
    p.add_argument("--eval-images", type=int, default=2000,
                   help="test images per timed evaluation pass (default: 2000; 0 = the whole test split)")
    p.add_argument("--target-acc", type=float, default=None, metavar="A",
                   help="also train from scratch until test accuracy >= A, e.g. 0.98 (default: off)")
    p.add_argument("--max-train-s", type=float, default=0.0,
                   help="stop a --target-acc run after this many training seconds (default: 0, no cap)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS training steps of our pipeline and print where the time goes (default: 0)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for both pipelines (default: 0, torch's own choice: one per core)")
    p.add_argument("--baseline-workers", type=int, default=0,
                   help="baseline DataLoader num_workers (default: 0, loading in the main process)")
    p.add_argument("--baseline-dims", choices=("config", "tutorial"), default="config",
                   help="baseline ViT dims: config = the config's model keys (a like-for-like speed ratio); "
                        "tutorial = patch 4, dim 64, depth 6, 4 heads, a typical tutorial ViT (default: config)")
    p.add_argument("--baseline-batch", type=int, default=64, help="baseline batch size (default: 64)")
    p.add_argument("--baseline-epochs", type=int, default=5,
                   help="baseline epochs, the length of its cosine schedule (default: 5)")
    p.add_argument("--suite", choices=("gpu",), default=None,
                   help="gpu: run the GPU suite instead (gpu_suite.py: training, launchers, resume, time to "
                        "accuracy, throughput and MFU on one CUDA GPU; results/gpu/)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dim=64 train.batch_size=64")
    return p.parse_args(argv)


def check_args(args):
    for name in ("windows", "window_steps", "baseline_batch", "baseline_epochs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("warmup_steps", "eval_images", "threads", "baseline_workers", "max_train_s", "profile"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    if args.target_acc is not None and not 0 < args.target_acc <= 1:
        raise UserError(f"--target-acc {args.target_acc} must be a fraction in (0, 1], e.g. 0.98")


# ---------------------------------------------------------------------------------- measurement

class Clock:
    """Wall seconds with the device's queued work finished first, so CUDA time is not hidden."""

    def __init__(self, device):
        self.device = device

    def now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter()


def reset_peak_memory(device):
    """Start a new peak for the next pipeline. Linux resets the RSS high-water mark (and with it
    getrusage's ru_maxrss) through clear_refs; elsewhere the peak stays the process's so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        scope = "pipeline"
    except OSError:
        scope = "process"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return scope


def peak_rss_mib():
    """The process's peak resident memory (since the last reset), or None where getrusage is
    missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def device_name(device):
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{device.type}: {name}"


class Reporter:
    """One JSON line per measurement on stdout; keeps the values for the ratios and the table."""

    def __init__(self, device):
        self.common = {"device": device_name(device), "torch": torch.__version__, "host_cpus": os.cpu_count(),
                       "torch_threads": torch.get_num_threads()}
        self.values, self.windows = {}, {}

    def emit(self, pipeline, metric, value, unit, config, echo=True, **extra):
        """One JSON line; `echo=False` keeps it out of the summary table (one of many alike)."""
        rec = {"pipeline": pipeline, "metric": metric, "value": value, "unit": unit, "config": config,
               **self.common, "load_avg_1m": _load_avg(), **extra}
        print(json.dumps(rec), flush=True)
        if not echo:
            return
        self.values[(pipeline, metric)] = (value, unit)
        if "windows" in extra:
            self.windows[(pipeline, metric)] = extra["windows"]

    def ratios(self, config):
        """A JSON line per metric both pipelines measured (images/s: > 1 is faster; s: < 1 is).
        For windowed metrics it is the median of the per-window ratios, each window of ours paired
        with the baseline's window right after it; the ratio of the medians comes along."""
        for (pipeline, metric), (value, _) in list(self.values.items()):
            base = self.values.get(("baseline", metric), (None,))[0]
            if pipeline != "ours" or value is None or not base or metric.startswith("peak_"):
                continue
            extra = {"ratio_of_medians": round(value / base, 3)}
            ow, bw = self.windows.get(("ours", metric)), self.windows.get(("baseline", metric))
            ratio = statistics.median(o / b for o, b in zip(ow, bw)) if ow and bw else value / base
            self.emit("ratio", metric, round(ratio, 3), "ours/baseline", config, **extra)

    def table(self, out=None):
        out = out or sys.stderr  # looked up now, not at import: tests and callers may swap it
        metrics = list(dict.fromkeys(m for p, m in self.values if p != "ratio"))
        rows = [("metric", "ours", "baseline", "ours/baseline")]
        for m in metrics:
            ours = self.values.get(("ours", m)) or self.values.get(("device", m), (None, ""))
            base = self.values.get(("baseline", m), (None, ""))
            rows.append((f"{m} ({ours[1] or base[1]})", _fmt(ours[0], unit=ours[1] or base[1]),
                         _fmt(base[0], unit=base[1]), _fmt(self.values.get(("ratio", m), (None,))[0], 2)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))),
                  file=out)
        return rows


def _load_avg():
    """The 1-minute load average when the line is written: above the core count, other processes
    competed for the cores during the measurement and its numbers are rough."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows
        return None


def _fmt(v, digits=1, unit=""):
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if unit == "fraction of peak" else f"{v:,.{digits}f}"


@dataclass
class Pipeline:
    """One pipeline, set up and ready for timed windows."""
    name: str
    summary: dict
    train_steps: Callable   # train_steps(n): n more training steps
    window_steps: int       # steps per timed window
    batch: int
    epoch_images: int       # images one epoch trains on
    evaluate: Callable      # evaluate(): one pass over eval_images test images
    eval_images: int
    time_to_acc: Callable   # time_to_acc(target, cap) -> (training seconds, test accuracy, [[s, acc], ...])
    extra: dict = field(default_factory=dict)  # more measurements: metric -> (value, unit, note)
    flops: dict = field(default_factory=dict)  # model FLOPs per image: {"train": ..., "eval": ...}
    dtype: torch.dtype = torch.float32         # the matrix dtype of its step (bf16/fp16 under autocast)


def warm_up(pipe, steps):
    """Untimed: first-call costs (allocator, kernels, torch.compile) stay out of the windows."""
    if steps:
        pipe.train_steps(steps)
    pipe.evaluate()


def interleaved_seconds(fns, clock, windows):
    """Seconds of each call, window by window, the pipelines taking turns: a change in the
    machine's load (other processes on shared cores) then hits every pipeline alike."""
    seconds = [[] for _ in fns]
    for _ in range(windows):
        for i, fn in enumerate(fns):
            t0 = clock.now()
            fn()
            seconds[i].append(clock.now() - t0)
    return seconds


# ------------------------------------------------------------------------- against the hardware

def matmul_peak(device, dtype, n=2048, repeats=5):
    """FLOP/s of the fastest of `repeats` timed n x n matrix products in `dtype`, each repeat long
    enough (about 0.2 s) to time: the practical peak that the model's FLOP/s are compared with."""
    clock = Clock(device)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    t0 = clock.now()
    a @ b  # warm-up, and a first estimate of its time
    reps = max(1, int(0.2 / max(clock.now() - t0, 1e-6)))
    best = 0.0
    for _ in range(repeats):
        t0 = clock.now()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (clock.now() - t0))
    return best


def flops_per_image(fn, batch):
    """Model FLOPs of fn() (matrix products, convolutions, attention) counted by torch's
    FlopCounterMode, per image of its batch."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def emit_mfu(rep, pipe, rates, peaks):
    """Achieved FLOP/s (FLOPs per image x images/s) against the measured peak of the same dtype."""
    peak = peaks[pipe.dtype]
    for kind in ("train", "eval"):
        if kind not in pipe.flops:
            continue
        achieved = pipe.flops[kind] * rates[kind]
        rep.emit(pipe.name, f"{kind}_mfu", round(achieved / peak, 4), "fraction of peak", pipe.summary,
                 flops_per_image=round(pipe.flops[kind]), achieved_gflops=round(achieved / 1e9, 1),
                 peak_gflops=round(peak / 1e9, 1), dtype=str(pipe.dtype).replace("torch.", ""),
                 note="model FLOPs per image x median images/s, over the matmul peak measured in this run")


def profile_steps(rep, pipe, steps, top=15):
    """Where the time of `steps` training steps goes: the operators with the most self time (on
    the device that ran them), their share of the total, one JSON line each and a table."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        pipe.train_steps(steps)
    events = prof.key_averages()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1
    print(f"\nwhere {steps} training steps spend their time ({key.replace('_', ' ')}):", file=sys.stderr)
    for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]:
        share = getattr(e, key) / total
        rep.emit(pipe.name, "profile_share", round(share, 4), "fraction of self time", pipe.summary, op=e.key,
                 calls=e.count, self_ms=round(getattr(e, key) / 1000, 2), steps=steps, echo=False)
        print(f"  {100 * share:5.1f}%  {e.key:<40} {e.count:>7} calls  {getattr(e, key) / 1000:9.1f} ms",
              file=sys.stderr)


# ------------------------------------------------------------------------------------ our pipeline

def ours_stepper(t, split, ctx):
    """step_fn(n): n more training steps through train.train_one_epoch, moving on to the next
    epoch's permutation when one runs out."""
    state, stop = TrainState(), StopSignal()  # a StopSignal never installed: never stops

    def step_fn(n):
        while n > 0:
            if state.step >= ctx.steps_per_epoch:
                state.epoch, state.step = state.epoch + 1, 0
            k = min(n, ctx.steps_per_epoch - state.step)
            window = replace(ctx, steps_per_epoch=state.step + k)  # train_one_epoch stops at its steps_per_epoch
            train.train_one_epoch(t, split, window, state, stop)
            n -= k
    return step_fn


class TimeCap(StopSignal):
    """Asks train_one_epoch to stop once the training clock passes the cap (checked every step)."""

    def __init__(self, spent, cap):
        super().__init__()
        self.start, self.spent, self.cap = time.perf_counter(), spent, cap

    def agreed(self, device, world):
        return bool(self.cap) and self.spent + time.perf_counter() - self.start >= self.cap


def evaluated_model(t):
    """What train.py evaluates and infer.py uses: the EMA weights when the run keeps them."""
    return t.ema.module if t.ema is not None else t.raw


def compile_seconds(ctx, model_args, split, clock):
    """With train.compile: one step of a throwaway copy, off the clock, so the run that is timed
    reuses the compiled code; returns its seconds (compiling, mostly), or None without compile.
    Compiled code from earlier in this process (the warm-up) is dropped first, so this compiles
    again, with torch's on-disk caches as the earlier compile left them."""
    if not ctx.cfg.train.compile:
        return None
    torch._dynamo.reset()
    t0 = clock.now()
    ours_stepper(train.build_training(ctx.cfg, ctx, model_args), split, ctx)(1)
    return round(clock.now() - t0, 2)


def ours_time_to_acc(ctx, model_args, splits, clock, goal):
    """Train from scratch epoch by epoch until test accuracy >= goal[0] (or goal[1] training
    seconds pass); evaluation and compiling are off the clock (compile_s, apart)."""
    cfg, (target, cap) = ctx.cfg, goal
    compile_s = compile_seconds(ctx, model_args, splits[0], clock)
    t = train.build_training(cfg, ctx, model_args)
    state, spent, acc, curve = TrainState(), 0.0, 0.0, []
    while state.epoch < cfg.train.epochs:
        t0 = clock.now()
        stopped = train.train_one_epoch(t, splits[0], ctx, state, TimeCap(spent, cap))
        spent += clock.now() - t0
        acc = train.evaluate(evaluated_model(t), splits[1], ctx, cfg.model.image_size, cfg.train.eval_batch_size)["acc"]
        state.epoch, state.step = state.epoch + 1, 0
        curve.append([round(spent, 2), round(acc, 4)])
        if acc >= target or stopped:
            break
    return spent, acc, curve, {"compile_s": compile_s}


def setup_ours(cfg, args, device, clock):
    """train.py's pipeline for one rank: device-resident data, the config's model and optimizer."""
    tcfg, logger = cfg.train, logging.getLogger("bench")
    t0 = time.perf_counter()
    splits = load_data(cfg.data, cfg.model.image_size, device, tcfg.seed, logger)
    train_split, test_split, info = splits.train, splits.test, splits.info
    load_s = time.perf_counter() - t0
    spe = train.count_steps(len(train_split), tcfg.batch_size)
    ctx = train.RunCtx(cfg, device, 0, 1, info, train.amp_dtype_for(tcfg.amp, device), spe, logger)
    model_args = model_args_from_config(cfg.model, info.in_channels, len(info.classes))
    t = train.build_training(cfg, ctx, model_args)
    sub = _head(test_split, args.eval_images)
    return Pipeline(
        "ours", ours_summary(cfg, ctx, len(train_split)), ours_stepper(t, train_split, ctx),
        min(args.window_steps, spe), tcfg.batch_size, spe * tcfg.batch_size,
        lambda: train.evaluate(evaluated_model(t), sub, ctx, cfg.model.image_size, tcfg.eval_batch_size), len(sub),
        lambda target, cap: ours_time_to_acc(ctx, model_args, (train_split, test_split), clock, (target, cap)),
        {"data_load_s": (round(load_s, 3), "s", "files to device-resident tensors")},
        ours_flops(t, ctx, train_split, sub), ctx.amp_dtype or torch.float32)


def ours_flops(t, ctx, split, test):
    """FLOPs per image of one training step (forward and backward) and of evaluation, on the raw
    model (a compiled graph hides its operations from the counter)."""
    b = ctx.cfg.train.batch_size
    x, y, lam = train.training_batch(split, torch.arange(b, device=ctx.device), ctx, 1, 0)
    flops = {"train": flops_per_image(lambda: train.forward_backward(replace(t, model=t.raw), x, y, lam, ctx, True), b)}
    t.optimizer.zero_grad(set_to_none=True)
    xe = normalize(test.images[:b], ctx.info.mean, ctx.info.std, ctx.cfg.model.image_size)
    with torch.no_grad():
        flops["eval"] = flops_per_image(lambda: evaluated_model(t)(xe), len(xe))
    return flops


def _head(split, n):
    return split if not n or n >= len(split) else Split(split.images[:n], split.labels[:n])


def ours_summary(cfg, ctx, n_train):
    m, t = cfg.model, cfg.train
    return {"dataset": cfg.data.dataset, "model": m.name, "image_size": m.image_size, "patch": m.patch_size,
            "dim": m.dim, "depth": m.depth, "heads": m.heads, "mlp_ratio": m.mlp_ratio, "batch": t.batch_size,
            "optimizer": t.optimizer, "lr": t.lr, "epochs": t.epochs, "scheduler": t.scheduler,
            "amp": str(ctx.amp_dtype).replace("torch.", "") if ctx.amp_dtype else "off", "compile": t.compile,
            "augment": cfg.data.augment, "loader": "device-resident tensors", "train_images": n_train}


# ------------------------------------------------------------------------------ DataLoader baseline

def setup_baseline(cfg, args, device, clock):
    """The DataLoader baseline on the same files, at the chosen model dims."""
    d, dims = cfg.data, baseline_dims(cfg, args.baseline_dims)
    tx, ty, vx, vy, info = load_raw(d.dataset, d.data_root, d.download, cfg.model.image_size, d.num_workers,
                                    logging.getLogger("bench"))
    tx, ty = (tx[:d.train_limit], ty[:d.train_limit]) if d.train_limit else (tx, ty)
    vx, vy = (vx[:d.test_limit], vy[:d.test_limit]) if d.test_limit else (vx, vy)
    if len(tx) < args.baseline_batch:
        raise UserError(f"the training set has {len(tx)} images, fewer than one baseline batch of "
                        f"{args.baseline_batch}; lower --baseline-batch or raise data.train_limit")
    base = Baseline(cfg, dims, info, device, args.baseline_epochs, baseline_loaders(cfg, args, info, (tx, ty, vx, vy)))
    model, optimizer, scheduler = base.build()
    n_eval = min(args.eval_images or len(vx), len(vx))
    n_eval = min(len(vx), -(-n_eval // cfg.train.eval_batch_size) * cfg.train.eval_batch_size)  # whole batches
    return Pipeline(
        "baseline", baseline_summary(args, dims, cfg.data.dataset, len(tx)),
        baseline_stepper((model, optimizer, scheduler), base.loaders[0], device),
        min(args.window_steps, len(base.loaders[0])), args.baseline_batch, len(tx),
        lambda: baseline_eval(model, base.loaders[1], device, n_eval), n_eval,
        lambda target, cap: baseline_time_to_acc(base, clock, target, cap), flops=baseline_flops(base, device))


def baseline_flops(base, device):
    """FLOPs per image of the baseline's training step and evaluation, on a copy of its model."""
    model, _, _ = base.build()
    x, y = (v.to(device) for v in next(iter(base.loaders[0])))
    flops = {"train": flops_per_image(lambda: F.cross_entropy(model(x), y).backward(), len(x))}
    with torch.no_grad():
        flops["eval"] = flops_per_image(lambda: model(x), len(x))
    return flops


# ------------------------------------------------------------------------------------------ output

def emit_speed(rep, pipe, train_s, eval_s):
    """Images/s per window (median reported) and the epoch time extrapolated from the median."""
    rates = [pipe.window_steps * pipe.batch / t for t in train_s]
    med = statistics.median(rates)
    rep.emit(pipe.name, "train_images_per_s", round(med, 1), "images/s", pipe.summary,
             windows=[round(r, 1) for r in rates], window_steps=pipe.window_steps)
    rep.emit(pipe.name, "epoch_time_s", round(pipe.epoch_images / med, 3), "s", pipe.summary,
             note=f"extrapolated: {pipe.epoch_images} images / the median images/s; no evaluation")
    rates = [pipe.eval_images / t for t in eval_s]
    rep.emit(pipe.name, "eval_images_per_s", round(statistics.median(rates), 1), "images/s", pipe.summary,
             windows=[round(r, 1) for r in rates], eval_images=pipe.eval_images)
    for metric, (value, unit, note) in pipe.extra.items():
        rep.emit(pipe.name, metric, value, unit, pipe.summary, note=note)
    return {"train": med, "eval": statistics.median(rates)}


def emit_memory(rep, pipe, memory):
    rss_mib, cuda_mib, scope = memory
    rep.emit(pipe.name, "peak_rss_mib", None if rss_mib is None else round(rss_mib, 1), "MiB", pipe.summary,
             scope=scope, note="set-up, data and warm-up steps (the steady state of the loop)")
    if cuda_mib is not None:
        rep.emit(pipe.name, "peak_cuda_allocated_mib", round(cuda_mib, 1), "MiB", pipe.summary)


def emit_tta(rep, pipe, goal, result):
    (target, cap), (spent, acc, curve, *more) = goal, result
    reached = acc >= target
    rep.emit(pipe.name, f"time_to_{target:g}_s", round(spent, 2) if reached else None, "s", pipe.summary,
             reached=reached, final_acc=round(acc, 4), train_s=round(spent, 2), max_train_s=cap or None,
             curve_s_acc=curve, **(more[0] if more else {}),
             note="training seconds from a fresh model; evaluation after each epoch and compiling are off the clock")


def prepare(setup, cfg, args, device, clock):
    """Set up and warm up one pipeline; returns it with its peak memory over that phase."""
    scope = reset_peak_memory(device)
    if setup is setup_baseline and scope == "pipeline":
        scope = "process: holds our pipeline too"
    pipe = setup(cfg, args, device, clock)
    warm_up(pipe, args.warmup_steps)
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return pipe, (peak_rss_mib(), cuda, scope)


@user_errors
def main(argv=None):
    args = parse_args(argv)
    if args.suite == "gpu":
        import gpu_suite
        return gpu_suite.run_suite(args)
    check_args(args)
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.train.device)
    configure_cuda(device, cfg.train.tf32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.baseline:
        baseline_dims(cfg, args.baseline_dims)  # a bad combination stops before anything runs
    rep, clock = Reporter(device), Clock(device)
    pipes = [prepare(s, cfg, args, device, clock) for s in ([setup_ours, setup_baseline] if args.baseline
                                                            else [setup_ours])]
    train_s = interleaved_seconds([lambda p=p: p.train_steps(p.window_steps) for p, _ in pipes], clock, args.windows)
    eval_s = interleaved_seconds([p.evaluate for p, _ in pipes], clock, args.windows)
    peaks = {dt: matmul_peak(device, dt) for dt in {p.dtype for p, _ in pipes}}
    for dt, peak in peaks.items():
        rep.emit("device", "matmul_peak_gflops", round(peak / 1e9, 1), "GFLOP/s", {"n": 2048},
                 dtype=str(dt).replace("torch.", ""), note="the fastest of 5 timed 2048x2048 matrix products")
    for i, (pipe, memory) in enumerate(pipes):
        rates = emit_speed(rep, pipe, train_s[i], eval_s[i])
        emit_memory(rep, pipe, memory)
        emit_mfu(rep, pipe, rates, peaks)
    if args.target_acc is not None:
        goal = (args.target_acc, args.max_train_s)
        for pipe, _ in pipes:
            emit_tta(rep, pipe, goal, pipe.time_to_acc(*goal))
    rep.ratios({"baseline_dims": args.baseline_dims})
    rep.table()
    if args.profile:
        profile_steps(rep, pipes[0][0], args.profile)
    return 0


if __name__ == "__main__":
    exit_with(main)
