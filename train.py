"""Train (or evaluate) a ViT on MNIST, Fashion-MNIST, CIFAR-10 or an image folder.

    python train.py [--config FILE] [key.sub=value ...]       one process, device auto-selected
    python train.py --num-gpus N [...]                         N local workers (train.device=cpu: N CPU workers)
    torchrun --nproc_per_node N train.py [...]                 env:// rendezvous; a PyTorchJob pod works the same
    python train.py --eval --checkpoint PATH [...]             evaluate a checkpoint on the test split

One code path serves every world size: the data is sharded by rank, metrics are all-reduced
sums, and only rank 0 writes files. The file reads top to bottom: arguments, building the run,
the epoch, evaluation, the loop; runs.py keeps what a run leaves behind.
"""
import os

# Before torch loads OpenMP: an idle OpenMP thread spins for a short while, then sleeps, so a run that
# shares its cores with other work (another run) slows down in proportion, not several-fold (docs/bench.md).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import argparse
import contextlib
import errno
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from augment import augment, batch_generator, mix_batch
from checkpoint import Checkpointer, TrainState, init_weights, load_trained, newest_final
from data import epoch_permutation, load_data, normalize, shard_bounds, to_device
from launch import (EXIT_LOST_PEER, EXIT_PREEMPTED, StopSignal, all_reduce_, check_local_launch, close_group, dist_env,
                    from_rank0, init_distributed, launch_local, leave_group, lost_peer, cpu_threads)
from model import ModelEMA, build_model, model_args_from_config
from runs import Loggers, Progress, RunLock, choose_run, open_outputs, plot_confusion
from utils import (UserError, configure_cuda, ensure_writable, exit_with, load_config, print_error, resolve_device,
                   seed_everything, setup_logging, user_errors)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train or evaluate a Vision Transformer. Config keys are "
                                "overridden as key.sub=value after the flags (see config.yaml).")
    p.add_argument("--config", default=None, help="YAML layered on config.yaml (default: config.yaml alone)")
    p.add_argument("--num-gpus", type=int, default=0, metavar="N",
                   help="spawn N local workers, one per GPU; with train.device=cpu, N CPU workers on gloo "
                        "(default: 0, one process)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-cuda", action="store_true", help="do not use CUDA (as train.device=cpu when device is auto)")
    p.add_argument("--no-mps", action="store_true", help="do not use Apple MPS when device is auto")
    p.add_argument("--eval", action="store_true", help="evaluate --checkpoint on the test split, no training")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval (default: newest final weights)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=3 model.dim=128")
    return p.parse_args(argv)


def config_from_args(args):
    cfg = load_config(args.config, args.overrides)
    if args.no_cuda and cfg.train.device == "cuda":
        raise UserError("--no-cuda contradicts train.device=cuda; drop one of them")
    if args.no_cuda and cfg.train.device == "auto":
        cfg = load_config(args.config, args.overrides, {"train": {"device": "cpu"}})
    return cfg


# ------------------------------------------------------------------------------- building the run

WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


@dataclass
class RunCtx:
    """What stays fixed for a run."""
    cfg: object
    device: torch.device
    rank: int
    world: int
    info: object
    amp_dtype: object
    steps_per_epoch: int
    logger: object


@dataclass
class Training:
    """The objects one rank trains with; checkpoint.py saves and restores them."""
    raw: torch.nn.Module        # the network itself: what is saved and evaluated
    model: torch.nn.Module      # what the step calls: raw, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    schedule: "Schedule"
    scaler: torch.amp.GradScaler
    ema: ModelEMA = None


def param_groups(model, weight_decay):
    """Weight decay on weight matrices and conv kernels only: never on norms, biases, the CLS token
    or position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = any(k in name for k in ("pos_embed", "cls_token", "class_token", "pos_embedding"))
        (no_decay if p.ndim < 2 or is_embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, tcfg, lr, device):
    groups = param_groups(model, tcfg.weight_decay)
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=tcfg.momentum, nesterov=tcfg.momentum > 0)
    cls = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    extra = {"fused": True} if fused_adam(device) else {}
    return cls(groups, lr=lr, amsgrad=tcfg.amsgrad, **extra)


def fused_adam(device):
    """Adam/AdamW as one fused kernel on CUDA: no per-parameter launches, and the grad scaler's
    inf check stays on the device. The CPU has a fused kernel too (torch 2.14: 0.43 vs 2.0 ms per
    step of the default model), but it rounds differently (val_acc 0.9598 vs 0.9596 after one epoch
    on 20k images), so the CPU keeps the loop and its results."""
    return device.type == "cuda"


def lr_factor(step, total_steps, steps_per_epoch, tcfg):
    """LR multiplier at optimizer step `step` (0-based): linear warmup, then the schedule."""
    warmup = int(round(tcfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    t, span = step - warmup, max(1, total_steps - warmup)
    floor = tcfg.min_lr_ratio
    if tcfg.scheduler == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span))
    if tcfg.scheduler == "cosine_restarts":
        cycle = max(1, int(round(tcfg.restart_epochs * steps_per_epoch)))
        while t >= cycle:
            t -= cycle
            cycle *= tcfg.restart_mult
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / cycle))
    if tcfg.scheduler == "step":
        return tcfg.gamma ** int(t // max(1, round(tcfg.step_epochs * steps_per_epoch)))
    return 1.0


class Schedule:
    """Sets the learning rate per optimizer step from lr_factor(); its state is the step count."""

    def __init__(self, optimizer, base_lr, total_steps, steps_per_epoch, tcfg):
        self.optimizer, self.base_lr, self.total, self.spe, self.tcfg = (optimizer, base_lr, total_steps,
                                                                         steps_per_epoch, tcfg)
        self.step_count = 0
        self._apply()

    def _apply(self):
        lr = self.base_lr * lr_factor(self.step_count, self.total, self.spe, self.tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self):
        self.step_count += 1
        self._apply()

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self):
        return {"step_count": self.step_count}

    def load_state_dict(self, state):
        self.step_count = int(state["step_count"])
        self._apply()


def amp_dtype_for(choice, device):
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if choice == "bf16" else torch.float16


def enough_epochs(cfg, steps_per_epoch, logger):
    """cfg with train.epochs raised so that training takes at least train.min_steps steps: a small
    data set gets as many updates as a large one would in its epochs."""
    need = math.ceil(cfg.train.min_steps / steps_per_epoch)
    if need <= cfg.train.epochs:
        return cfg
    logger.info(f"train.min_steps={cfg.train.min_steps}: {need} epochs of {steps_per_epoch} steps "
                f"instead of train.epochs={cfg.train.epochs}")
    cfg = OmegaConf.merge(cfg, {"train": {"epochs": need}})
    OmegaConf.set_readonly(cfg, True)
    return cfg


def count_steps(n_train, global_batch):
    """Whole global batches per epoch (the last partial one is dropped, so every rank's slice of a
    step has the same size)."""
    if n_train < global_batch:
        raise UserError(f"the training set has {n_train} images, fewer than one batch of {global_batch} "
                        f"(train.batch_size * world size); lower train.batch_size or raise data.train_limit")
    return n_train // global_batch


def build_training(cfg, ctx, model_args):
    """Model (raw and, with train.compile, compiled), optimizer, LR schedule, grad scaler and EMA
    of one rank. bench.py builds through here too, so it measures exactly what train.py runs."""
    tcfg = cfg.train
    seed_everything(tcfg.seed)  # the same initial weights on every rank
    raw = build_model(model_args).to(ctx.device)
    lr = tcfg.lr * (ctx.world * tcfg.grad_accum if tcfg.scale_lr else 1)
    optimizer = build_optimizer(raw, tcfg, lr, ctx.device)
    opt_steps_per_epoch = math.ceil(ctx.steps_per_epoch / tcfg.grad_accum)
    schedule = Schedule(optimizer, lr, tcfg.epochs * opt_steps_per_epoch, opt_steps_per_epoch, tcfg)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
    seed_everything(tcfg.seed + ctx.rank)  # dropout draws differ per rank
    model = compiled(raw, tcfg, ctx)
    ema = ModelEMA(raw, tcfg.ema_decay, tcfg.ema_warmup) if tcfg.ema else None
    return Training(raw, model, optimizer, schedule, scaler, ema)


def compiled(raw, tcfg, ctx):
    """torch.compile(raw) with train.compile_backend where it helps: not on MPS (off, with a line);
    on the CPU it compiles, with a line on what that costs."""
    if not tcfg.compile:
        return raw
    if ctx.device.type == "mps":
        ctx.logger.info("train.compile is off on MPS: torch.compile's MPS backend is a prototype, and eager runs")
        return raw
    if ctx.device.type == "cpu":
        ctx.logger.info("train.compile on the CPU: compiling takes about 30 s and measured slower end to end than "
                        "eager on this project's CPU; train.compile=false skips it")
    return torch.compile(raw, backend=tcfg.compile_backend)


def wrap_ddp(t, ctx):
    """After a resume has loaded the raw weights: every rank starts from rank 0's."""
    if ctx.world > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        t.model = torch.nn.parallel.DistributedDataParallel(t.model, device_ids=ids)


def setup(cfg, args, rank, world, local_rank):
    """Device, process group, logging, threads. Returns (device, logger)."""
    device = resolve_device(cfg.train.device, args.no_mps, local_rank)
    init_distributed(cfg, device, rank, world)
    configure_cuda(device, cfg.train.tf32)
    logger = setup_logging(rank, cfg.log.level)
    cpu_threads(device, cfg.train.threads)
    return device, logger


# ------------------------------------------------------------------------------------- the epoch

def training_batch(split, idx, ctx, epoch, step):
    """This rank's augmented, normalised (and maybe mixed) slice of one global batch: (x, y, lam)."""
    d, b = ctx.cfg.data, ctx.cfg.train.batch_size
    gen = batch_generator(ctx.cfg.train.seed, epoch, step)
    x = augment(to_device(split.images[idx], ctx.device), gen, d, ctx.info, (ctx.rank * b, b * ctx.world))
    x = normalize(x, ctx.info.mean, ctx.info.std, ctx.cfg.model.image_size)
    lam = 1.0
    if d.augment and (d.mixup_alpha > 0 or d.cutmix_alpha > 0) and not 0 < d.mix_off_epoch <= epoch:
        x, lam = mix_batch(x, gen, d.mixup_alpha, d.cutmix_alpha)  # pairs within this rank's slice
    return x, to_device(split.labels[idx], ctx.device), lam


def forward_backward(t, x, y, lam, ctx, boundary):
    """Loss and gradients of one micro-batch; DDP syncs gradients only at an optimizer step."""
    tcfg, ddp = ctx.cfg.train, hasattr(t.model, "no_sync")
    with t.model.no_sync() if ddp and not boundary else contextlib.nullcontext():
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.float32, enabled=ctx.amp_dtype is not None):
            logits = t.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=tcfg.label_smoothing)
            if lam < 1.0:
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=tcfg.label_smoothing)
        t.scaler.scale(loss / tcfg.grad_accum).backward()
    return loss, logits


def optimizer_step(t, tcfg):
    if tcfg.grad_clip > 0:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), tcfg.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.schedule.step()
    if t.ema is not None:
        t.ema.update()


def train_one_epoch(t, split, ctx, state, stop, progress=None):
    """Train from state.step to the end of epoch state.epoch+1. Returns True if stopped early by a
    signal (at an optimizer-step boundary). Metrics stay on the device until the epoch ends."""
    tcfg, dev = ctx.cfg.train, ctx.device
    epoch, b = state.epoch + 1, tcfg.batch_size
    G, lo = b * ctx.world, ctx.rank * b
    perm = epoch_permutation(len(split), tcfg.seed, epoch, split.labels.device)  # where the split lives
    fdtype = torch.float32 if dev.type == "mps" else torch.float64
    sums = torch.zeros(3, device=dev, dtype=fdtype)
    if ctx.rank == 0:
        sums += torch.tensor(state.sums, device=dev, dtype=fdtype)
    n_step = torch.full((), float(b), device=dev, dtype=fdtype)  # made once: a copy per step would wait for the device
    for step in range(state.step, ctx.steps_per_epoch):
        x, y, lam = training_batch(split, perm[step * G + lo: step * G + lo + b], ctx, epoch, step)
        boundary = (step + 1) % tcfg.grad_accum == 0 or step + 1 == ctx.steps_per_epoch
        loss, logits = forward_backward(t, x, y, lam, ctx, boundary)
        with torch.no_grad():
            sums += torch.stack([loss.detach().to(fdtype) * y.numel(), (logits.argmax(1) == y).sum().to(fdtype),
                                 n_step])
        if boundary:
            optimizer_step(t, tcfg)
        state.step = step + 1
        if progress is not None:
            progress.update(state.step, sums, t.schedule.lr())
        at_interval = (step + 1) % tcfg.log_interval == 0
        if boundary and (ctx.world == 1 or at_interval) and stop.agreed(dev, ctx.world):
            state.sums = all_reduce_(sums, ctx.world).tolist()
            return True
    state.sums = all_reduce_(sums, ctx.world).tolist()
    return False


def run_epoch(t, ctx, state, split, stop):
    """Train the rest of epoch state.epoch+1 and time it. Returns the training images/s of what
    ran, or None when a signal stopped it mid-epoch."""
    progress = Progress(ctx, state) if ctx.rank == 0 else None
    t0, start_step = time.perf_counter(), state.step
    interrupted = train_one_epoch(t, split, ctx, state, stop, progress)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - t0
    state.partial_time += seconds
    if progress is not None:
        progress.close()
    if interrupted:
        return None
    return (ctx.steps_per_epoch - start_step) * ctx.cfg.train.batch_size * ctx.world / max(seconds, 1e-9)


# ------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model, split, ctx, image_size, eval_batch_size):
    """Loss, accuracy and confusion matrix over the whole split: each rank takes a disjoint
    contiguous shard and the sums are all-reduced, so every image counts exactly once."""
    was_training = model.training
    model.eval()
    dev, C = ctx.device, len(ctx.info.classes)
    lo, hi = shard_bounds(len(split), ctx.rank, ctx.world)
    loss_sum = torch.zeros(1, device=dev, dtype=torch.float32 if dev.type == "mps" else torch.float64)
    confusion = torch.zeros(C * C, device=dev, dtype=torch.int64)
    for i in range(lo, hi, eval_batch_size):
        j = min(hi, i + eval_batch_size)
        x = normalize(to_device(split.images[i:j], dev), ctx.info.mean, ctx.info.std, image_size)
        y = to_device(split.labels[i:j], dev)
        with torch.autocast(dev.type, dtype=ctx.amp_dtype or torch.float32, enabled=ctx.amp_dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").to(loss_sum.dtype)
        confusion.index_add_(0, y * C + logits.argmax(1), torch.ones_like(y))  # bincount would wait for the device
    all_reduce_(loss_sum, ctx.world)
    all_reduce_(confusion, ctx.world)
    model.train(was_training)
    confusion = confusion.view(C, C).cpu()
    n = int(confusion.sum())
    return {"loss": float(loss_sum.item()) / max(n, 1), "acc": float(confusion.diag().sum()) / max(n, 1),
            "n": n, "confusion": confusion}


def epoch_record(t, ctx, state, val, images_per_s):
    """The metrics.jsonl line of the epoch that just finished training (evaluated here)."""
    cfg, t1 = ctx.cfg, time.perf_counter()
    res = evaluate(t.raw, val, ctx, cfg.model.image_size, cfg.train.eval_batch_size)
    ema = evaluate(t.ema.module, val, ctx, cfg.model.image_size, cfg.train.eval_batch_size) if t.ema else None
    loss_sum, correct, n = state.sums
    return {"epoch": state.epoch + 1, "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
            "val_loss": res["loss"], "val_acc": res["acc"],
            **({"ema_val_loss": ema["loss"], "ema_val_acc": ema["acc"]} if ema else {}),
            "lr": t.schedule.lr(), "epoch_time_s": round(state.partial_time, 3),
            "images_per_s": round(images_per_s, 1), "eval_time_s": round(time.perf_counter() - t1, 3),
            "val_images": res["n"], "world_size": ctx.world}


def test_result(t, ctx, state, splits):
    """The test split, once, with the weights infer.py uses (EMA when kept). Without a held-out
    validation part the last epoch's evaluation was already on the test split."""
    prefix = "ema_val" if t.ema else "val"
    last = state.history[-1]
    if not splits.held_out:
        return {"test_loss": last[f"{prefix}_loss"], "test_acc": last[f"{prefix}_acc"],
                "test_images": last["val_images"]}
    cfg = ctx.cfg
    res = evaluate(t.ema.module if t.ema else t.raw, splits.test, ctx, cfg.model.image_size, cfg.train.eval_batch_size)
    return {"test_loss": res["loss"], "test_acc": res["acc"], "test_images": res["n"]}


def run_eval(cfg, args, rank, world, local_rank):
    path = args.checkpoint or newest_final(cfg.checkpoint.dir)
    if path is None:
        raise UserError(f"--eval needs --checkpoint PATH (no *_final.pth in {cfg.checkpoint.dir})")
    if os.path.isdir(path):
        path = newest_final(path) or path
    model, ckpt, kind = load_trained(path)  # a bad file stops here, before any process group
    device, logger = setup(cfg, args, rank, world, local_rank)
    info_d, margs = ckpt["data_info"], ckpt["model_args"]
    dcfg = OmegaConf.merge(cfg.data, {"dataset": info_d["dataset"], "train_limit": 1, "val_split": 0.0})
    test, info = (lambda s: (s.test, s.info))(load_data(dcfg, margs["image_size"], device, logger=logger))
    info.mean, info.std, info.classes = tuple(info_d["mean"]), tuple(info_d["std"]), info_d["classes"]
    ctx = RunCtx(cfg, device, rank, world, info, amp_dtype_for(cfg.train.amp, device), 0, logger)
    res = evaluate(model.to(device), test, ctx, margs["image_size"], cfg.train.eval_batch_size)
    if rank == 0:
        print(f"Checkpoint: {path} ({kind} weights)")
        print_eval(res, info.classes)
        name = os.path.normpath(path)  # an export folder given as DIR/: its figure goes beside it, not in it
        out = os.path.splitext(name)[0] + "_confusion.png"
        plot_confusion(res["confusion"], info.classes,
                       f"{os.path.basename(name)}: {100 * res['acc']:.2f}% of {res['n']}", out)
        print(f"Confusion matrix: {out}")
    return 0


def print_eval(res, classes):
    print(f"Total Samples: {res['n']}")
    print(f"Global Average Loss: {res['loss']:.4f}")
    print(f"Global Accuracy: {100 * res['acc']:.2f}%")
    cm = res["confusion"]
    for c, name in enumerate(classes):
        total = int(cm[c].sum())
        acc = f"{100 * int(cm[c, c]) / total:.2f}%" if total else "n/a"
        print(f"  class {name:>12}: {acc} of {total}")


# -------------------------------------------------------------------------------------- the loop

@dataclass
class Outputs:
    """What the loop writes to and listens to."""
    ckpt: Checkpointer
    loggers: "Loggers"
    stop: StopSignal


def close_epoch(state, record, tcfg):
    """Move `state` past the epoch of `record`. Returns (improved, early stop)."""
    score = record.get("ema_val_acc", record["val_acc"])  # best.pth and early stopping follow what infer.py uses
    improved = score > state.best_val_acc + tcfg.early_stop_min_delta
    state.history.append(record)
    state.epoch, state.step, state.sums, state.partial_time = record["epoch"], 0, [0.0, 0.0, 0.0], 0.0
    if improved:
        state.best_val_acc, state.bad_epochs = score, 0
    else:
        state.bad_epochs += 1
    return improved, finished(state, tcfg)


def finished(state, tcfg):
    """All epochs done, or early stopping has ended the run."""
    early = tcfg.early_stop_patience > 0 and state.bad_epochs >= tcfg.early_stop_patience
    return state.epoch >= tcfg.epochs or early


def train_loop(t, ctx, state, splits, out):
    """Epochs until done, early-stopped or signalled; returns the exit code. In a PyTorchJob a pod
    that exits 0 counts as done, so a stopped k8s run exits EXIT_PREEMPTED and is restarted."""
    tcfg, logger = ctx.cfg.train, ctx.logger
    stopped_code = EXIT_PREEMPTED if ctx.cfg.environment == "k8s" else 0
    while state.epoch < tcfg.epochs:
        images_per_s = run_epoch(t, ctx, state, splits.train, out.stop)
        if images_per_s is None:
            path = out.ckpt.interrupted(t, state)
            logger.info(f"stopped by signal at epoch {state.epoch + 1}, step {state.step}/{ctx.steps_per_epoch}; "
                        f"saved {path}. Continue with checkpoint.resume=true")
            return stopped_code
        record = epoch_record(t, ctx, state, splits.val, images_per_s)
        improved, done = close_epoch(state, record, tcfg)
        stopping = not done and out.stop.agreed(ctx.device, ctx.world)
        out.ckpt.end_of_epoch(t, state, improved, last=done or stopping)
        out.loggers.epoch(record, state.history)
        if done and state.epoch < tcfg.epochs:
            logger.info(f"early stop: val_acc has not improved by {tcfg.early_stop_min_delta} for "
                        f"{state.bad_epochs} epochs")
        if stopping:
            logger.info(f"stopped by signal after epoch {state.epoch}; continue with checkpoint.resume=true")
            return stopped_code
        if done:
            break
    path = out.ckpt.final(t, state)
    out.loggers.done(state, test_result(t, ctx, state, splits), path, "EMA" if t.ema else "raw")
    return 0


def open_run(cfg, logger, rank, world):
    """The run folder all ranks write to (rank 0 chooses it, checks that it can write there and
    locks it), and rank 0's lock. A refusal is raised on every rank."""
    run, lock = None, None
    if rank == 0:
        try:
            run = choose_run(cfg, logger)
            ensure_writable(run.ckpt, "checkpoint.dir")
            ensure_writable(run.log, "log.dir")
            lock = RunLock(run.ckpt)
        except UserError as e:
            run = e
    run = from_rank0(run, world)
    if isinstance(run, UserError):
        raise run
    return run, lock


def run_train(cfg, args, rank, world, local_rank):
    device, logger = setup(cfg, args, rank, world, local_rank)
    run, lock = open_run(cfg, logger, rank, world)
    try:
        return train_run(cfg, (device, logger, rank, world), run, lock)
    finally:
        if lock is not None:
            lock.release(run)


def train_run(cfg, where, run, lock):
    """Data, model, resume, then the loop; nothing is written before the run is known to train."""
    device, logger, rank, world = where
    splits = load_data(cfg.data, cfg.model.image_size, device, cfg.train.seed, logger)
    global_batch = cfg.train.batch_size * world
    steps = count_steps(len(splits.train), global_batch)
    cfg = enough_epochs(cfg, steps, logger)
    ctx = RunCtx(cfg, device, rank, world, splits.info, amp_dtype_for(cfg.train.amp, device), steps, logger)
    model_args = model_args_from_config(cfg.model, splits.info.in_channels, len(splits.info.classes))
    t, state, ckpt = build_training(cfg, ctx, model_args), TrainState(), Checkpointer(cfg, ctx, model_args, run)
    resumed = ckpt.resume(t, state)
    if not resumed and cfg.model.init_from:  # a resumed fine-tune continues from its own checkpoint instead
        logger.info(init_weights(t.raw, cfg.model.init_from))
        if t.ema is not None:
            t.ema.restart()
    if resumed and finished(state, cfg.train):
        logger.info(f"run '{run.name}' has finished ({state.epoch} epochs; train.epochs={cfg.train.epochs}): nothing "
                    f"to train, no file changed. To train it further raise train.epochs; for a new run drop "
                    f"checkpoint.resume or choose another run.name")
        return 0
    if rank == 0:
        lock.claim()
        open_outputs(cfg, run, state, ckpt.resumed_config, logger)
    nparams = sum(p.numel() for p in t.raw.parameters())
    logger.info(f"run {run.name}: {splits.info.dataset} {len(splits.train)} train / {len(splits.val)} "
                f"{'val (held out)' if splits.held_out else 'test'} images on {device}, world size {world}; "
                f"{model_args['name']} with {nparams / 1e6:.2f}M parameters; global batch {global_batch}, "
                f"{ctx.steps_per_epoch} steps/epoch"
                + (f"; resumed from {resumed} (epoch {state.epoch}, step {state.step})" if resumed else ""))
    wrap_ddp(t, ctx)
    out = Outputs(ckpt, Loggers(cfg, run, logger, rank == 0), StopSignal())
    out.stop.install()
    try:
        return train_loop(t, ctx, state, splits, out)
    finally:
        out.stop.uninstall()
        out.loggers.close()


def run(args, rank, world, local_rank):
    """One worker: the same for 1 process, --num-gpus, torchrun and a PyTorchJob pod."""
    try:
        cfg = config_from_args(args)
        code = (run_eval if args.eval else run_train)(cfg, args, rank, world, local_rank)
        leave_group(rank, world, cfg.distributed.timeout_s)
        return code
    except UserError as e:
        print_error(e, rank if world > 1 else None)
        return e.code
    except Exception as e:
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:  # the disk filled up or went read-only mid-run
            print_error(f"cannot write {e.filename or 'a file of the run'} ({e.strerror}); every checkpoint "
                        f"written so far is whole: free space or fix the folder, then continue with "
                        f"checkpoint.resume=true", rank if world > 1 else None)
            return 1
        if not lost_peer(e, world):
            raise
        print(f"error (rank {rank}): another rank failed or stopped answering ({str(e).splitlines()[0][:160]}); "
              f"its own error, printed above or in its log, is the cause", file=sys.stderr, flush=True)
        return EXIT_LOST_PEER
    finally:
        close_group()


@user_errors
def main(argv=None):
    args = parse_args(argv)
    cfg = config_from_args(args)  # a bad config stops here, before any worker starts
    if args.checkpoint and not args.eval:
        raise UserError("--checkpoint is for --eval; to continue training use checkpoint.resume=true")
    if args.num_gpus < 0:
        raise UserError(f"--num-gpus {args.num_gpus} must be >= 1")
    rank, world, local_rank = dist_env(args.local_rank)
    if args.num_gpus and world > 1:
        raise UserError("--num-gpus cannot be used under torchrun or a PyTorchJob; the launcher already started "
                        "the workers")
    device = resolve_device(cfg.train.device, args.no_mps)  # e.g. train.device=cuda on a machine without one
    if args.num_gpus:
        check_local_launch(args.num_gpus, device, cfg.train.device)
        return launch_local(run, args, args.num_gpus, cfg.distributed.master_port)
    return run(args, rank, world, local_rank)


if __name__ == "__main__":
    exit_with(main)
