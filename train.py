"""Train (or evaluate) a ViT on MNIST, Fashion-MNIST, CIFAR-10 or an image folder.

    python train.py [--config FILE] [key.sub=value ...]       one process, device auto-selected
    python train.py --num-gpus N [...]                         N local workers (train.device=cpu: N CPU workers)
    torchrun --nproc_per_node N train.py [...]                 env:// rendezvous; a PyTorchJob pod works the same
    python train.py --eval --checkpoint PATH [...]             evaluate a checkpoint on the test split

One code path serves every world size: the data is sharded by rank, metrics are all-reduced
sums, and only rank 0 writes files.
"""
import argparse
import contextlib
import datetime
import io
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from data import NO_FLIP, augment, batch_generator, epoch_permutation, load_data, mix_batch, normalize, shard_bounds
from model import ModelEMA, build_model, final_weights_name, load_trained, model_args_from_config, strip_prefixes
from utils import (UserError, append_line, atomic_write_bytes, exit_with, epoch_ckpt_name, find_resume_checkpoint,
                   get_rng_state, load_checkpoint, load_config, newest_final, prune_checkpoints, serialize,
                   set_rng_state, seed_everything, setup_logging, timestamp, to_plain, write_metrics)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train or evaluate a Vision Transformer. Config keys are "
                                "overridden as key.sub=value after the flags (see config.yaml).")
    p.add_argument("--config", default=None, help="YAML layered on config.yaml (default: config.yaml alone)")
    p.add_argument("--num-gpus", type=int, default=0, metavar="N",
                   help="spawn N local workers, one per GPU; with train.device=cpu, N CPU workers on gloo (default: 0, one process)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-cuda", action="store_true", help="do not use CUDA (as train.device=cpu when device is auto)")
    p.add_argument("--no-mps", action="store_true", help="do not use Apple MPS when device is auto")
    p.add_argument("--eval", action="store_true", help="evaluate --checkpoint on the test split, no training")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval (default: newest final weights)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=3 model.dim=128")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ device, processes

def dist_env(args=None):
    """(rank, world_size, local_rank) from torchrun's / the PyTorchJob operator's variables.
    A PyTorchJob pod sets no LOCAL_RANK: one process per pod, so it is 0."""
    def number(name, default):
        value = os.environ.get(name, default)
        try:
            return int(value)
        except ValueError:
            raise UserError(f"environment variable {name}={value!r} is not an integer; a launcher (torchrun, "
                            f"the PyTorchJob operator) sets it, unset it to run one process") from None
    rank, world = number("RANK", "0"), number("WORLD_SIZE", "1")
    if "LOCAL_RANK" in os.environ or args is None or args.local_rank is None:
        local = number("LOCAL_RANK", "0")
    else:
        local = args.local_rank
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} do not fit (need 0 <= RANK < WORLD_SIZE); a launcher "
                        f"sets both, unset them to run one process")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise UserError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; a launcher (torchrun, the "
                            f"PyTorchJob operator) sets them, or use --num-gpus N for local workers")
    return rank, world, local


def resolve_device(choice, no_mps=False, local_rank=0):
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if choice == "auto":
        if torch.cuda.is_available():
            choice = "cuda"
        elif mps_ok and not no_mps:
            choice = "mps"
        else:
            choice = "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA GPU is visible to PyTorch; use train.device=auto or "
                            "train.device=cpu (or install a CUDA build of torch)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if choice == "mps":
        if not mps_ok:
            raise UserError("train.device=mps but Apple MPS is not available here; use train.device=auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def pick_backend(choice, device):
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" and sys.platform.startswith("linux") else "gloo"


def init_distributed(cfg, device, rank, world):
    if world == 1:
        return
    if device.type == "mps":
        raise UserError("MPS cannot run more than one process; use one process, or train.device=cpu with --num-gpus N")
    if sys.platform == "win32":
        os.environ.setdefault("USE_LIBUV", "0")  # torch >= 2.4 defaults to libuv, which Windows builds lack
    backend = pick_backend(cfg.distributed.backend, device)
    if backend == "nccl" and device.type != "cuda":
        raise UserError("distributed.backend=nccl needs CUDA; use distributed.backend=gloo for CPU workers")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.distributed.timeout_s)
    _GROUP["store"] = group_store(rank, world, timeout)
    dist.init_process_group(backend, store=_GROUP["store"], rank=rank, world_size=world, timeout=timeout)


_GROUP = {}  # the store of this process's group; leave_group() waits on it


def group_store(rank, world, timeout):
    """The env:// store (MASTER_ADDR/MASTER_PORT; rank 0 hosts it unless torchrun's agent does).
    torchrun keeps one store for all restarts (torch 2.14; pytorch/pytorch#135712): a restarted
    group would read the dead workers' addresses and fail or hang in its first connect. A prefix
    per restart keeps each attempt's keys apart."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return store


def leave_group(rank, world, timeout_s):
    """After a normal end, leave in order. gloo resets a peer's connection when a process exits with
    messages unread, and that fails a peer still inside the last collective ("Connection reset by
    peer" at the end of a finished run). So each rank waits on the store until every rank is past
    its last collective, and rank 0, which may host the store, leaves last."""
    if world == 1 or "store" not in _GROUP:
        return
    store = dist.PrefixStore("leave", _GROUP["store"])
    deadline = time.monotonic() + timeout_s

    def wait_for(key, count):
        while store.add(key, 0) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for the other ranks to finish")
            time.sleep(0.01)
    store.add("done", 1)
    wait_for("done", world)
    if rank == 0:
        wait_for("left", world - 1)
    else:
        with contextlib.suppress(Exception):  # rank 0 may already be gone with the store: all is done
            store.add("left", 1)


def all_reduce_(tensor, world):
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop stops at the next step boundary that all ranks agree on,
    saves a resumable checkpoint and exits 0. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self):
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, handler)

    def uninstall(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def agreed(self, device, world):
        if world == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# -------------------------------------------------------------------------------------- optimisation

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
    extra = {"fused": True} if device.type == "cuda" else {}
    return cls(groups, lr=lr, amsgrad=tcfg.amsgrad, **extra)


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
        self.optimizer, self.base_lr, self.total, self.spe, self.tcfg = optimizer, base_lr, total_steps, steps_per_epoch, tcfg
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


# ------------------------------------------------------------------------------------- train / eval

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
class TrainState:
    """What a checkpoint must hold to continue exactly."""
    epoch: int = 0                # completed epochs
    step: int = 0                 # batches done in the epoch in progress
    sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss*n, correct, n of that epoch so far
    partial_time: float = 0.0     # training seconds already spent in the epoch in progress
    history: list = field(default_factory=list)
    best_val_acc: float = -1.0
    bad_epochs: int = 0


def train_one_epoch(model, optimizer, schedule, scaler, split, ctx, state, stop, bar=None, ema=None):
    """Train from state.step to the end of epoch state.epoch+1. Returns True if stopped early by a
    signal (at an optimizer-step boundary). Metrics stay on the device until the epoch ends."""
    cfg, tcfg, dev = ctx.cfg, ctx.cfg.train, ctx.device
    epoch, b = state.epoch + 1, tcfg.batch_size
    G = b * ctx.world
    perm = epoch_permutation(len(split), tcfg.seed, epoch, dev)
    lo = ctx.rank * b
    fdtype = torch.float32 if dev.type == "mps" else torch.float64
    sums = torch.zeros(3, device=dev, dtype=fdtype)
    if ctx.rank == 0:
        sums += torch.tensor(state.sums, device=dev, dtype=fdtype)
    ddp = hasattr(model, "no_sync")
    d = cfg.data
    mixing = d.augment and (d.mixup_alpha > 0 or d.cutmix_alpha > 0) and not 0 < d.mix_off_epoch <= epoch
    for step in range(state.step, ctx.steps_per_epoch):
        idx = perm[step * G + lo: step * G + lo + b]
        gen = batch_generator(tcfg.seed, epoch, step)
        x = augment(split.images[idx], gen, d, ctx.info.digit_style, lo, G, ctx.info.dataset not in NO_FLIP)
        x = normalize(x, ctx.info.mean, ctx.info.std, cfg.model.image_size)
        y = split.labels[idx]
        lam = 1.0
        if mixing:  # pairs within this rank's slice of the batch
            x, lam = mix_batch(x, gen, d.mixup_alpha, d.cutmix_alpha)
        boundary = (step + 1) % tcfg.grad_accum == 0 or step + 1 == ctx.steps_per_epoch
        with model.no_sync() if ddp and not boundary else contextlib.nullcontext():
            with torch.autocast(dev.type, dtype=ctx.amp_dtype or torch.float32, enabled=ctx.amp_dtype is not None):
                logits = model(x)
                smooth = tcfg.label_smoothing
                loss = F.cross_entropy(logits, y, label_smoothing=smooth)
                if lam < 1.0:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=smooth)
            scaler.scale(loss / tcfg.grad_accum).backward()
        with torch.no_grad():
            sums += torch.stack([loss.detach().to(fdtype) * y.numel(), (logits.argmax(1) == y).sum().to(fdtype),
                                 torch.tensor(float(y.numel()), device=dev, dtype=fdtype)])
        if boundary:
            if tcfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if ema is not None:
                ema.update()
        state.step = step + 1
        at_interval = (step + 1) % tcfg.log_interval == 0
        if bar is not None and at_interval:
            bar.update(tcfg.log_interval)
            bar.set_postfix(loss=f"{(sums[0] / sums[2].clamp_min(1)).item():.4f}", lr=f"{schedule.lr():.2e}")
        if boundary and (ctx.world == 1 or at_interval) and stop.agreed(dev, ctx.world):
            state.sums = all_reduce_(sums, ctx.world).tolist()
            return True
    state.sums = all_reduce_(sums, ctx.world).tolist()
    return False


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
        x = normalize(split.images[i:j], ctx.info.mean, ctx.info.std, image_size)
        y = split.labels[i:j]
        with torch.autocast(dev.type, dtype=ctx.amp_dtype or torch.float32, enabled=ctx.amp_dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").to(loss_sum.dtype)
        confusion += torch.bincount(y * C + logits.argmax(1), minlength=C * C)
    all_reduce_(loss_sum, ctx.world)
    all_reduce_(confusion, ctx.world)
    model.train(was_training)
    confusion = confusion.view(C, C).cpu()
    n = int(confusion.sum())
    return {"loss": float(loss_sum.item()) / max(n, 1), "acc": float(confusion.diag().sum()) / max(n, 1),
            "n": n, "confusion": confusion}


# ------------------------------------------------------------------------------------------ outputs

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path):
    """PNG written atomically: a reader never sees half a plot."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(history, path):
    """Loss, accuracy and lr against epoch, written atomically."""
    plt = _pyplot()

    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    ax[0].plot(ep, [r["val_loss"] for r in history], "o-", label="val")
    ax[0].set_title("loss")
    ax[1].plot(ep, [r["train_acc"] for r in history], "o-", label="train")
    ax[1].plot(ep, [r["val_acc"] for r in history], "o-", label="val")
    ax[1].set_title("accuracy")
    ax[2].plot(ep, [r["lr"] for r in history], "o-")
    ax[2].set_title("learning rate (end of epoch)")
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax[0].legend()
    ax[1].legend()
    _save_figure(fig, path)


def plot_confusion(confusion, classes, title, path):
    plt = _pyplot()

    C = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * C, 0.8 + 0.6 * C))
    ax.imshow(confusion.numpy(), cmap="Blues")
    for i in range(C):
        for j in range(C):
            v = int(confusion[i, j])
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > confusion.max() / 2 else "black")
    ax.set_xticks(range(C), classes, rotation=45, ha="right")
    ax.set_yticks(range(C), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save_figure(fig, path)


class Loggers:
    """metrics.jsonl, TensorBoard and SwanLab, on rank 0 only."""

    def __init__(self, cfg, logger, enabled):
        self.enabled, self.tb, self.swan = enabled, None, None
        self.metrics_path = os.path.join(cfg.log.dir, "metrics.jsonl")
        if not enabled:
            return
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(cfg.log.dir, "tensorboard"))
            except ImportError:
                logger.warning("log.tensorboard=true but tensorboard is not installed; pip install tensorboard, "
                               "or set log.tensorboard=false")
        if cfg.log.swanlab:
            try:
                import swanlab
                self.swan = swanlab.init(project=cfg.log.swanlab_project, config=to_plain(cfg))
            except ImportError:
                logger.warning("log.swanlab=true but swanlab is not installed; pip install swanlab, or set log.swanlab=false")

    def epoch(self, record):
        if not self.enabled:
            return
        append_line(self.metrics_path, json.dumps(record))
        if self.tb is not None:
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["epoch"])
            self.tb.flush()
        if self.swan is not None:
            import swanlab
            swanlab.log({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


# -------------------------------------------------------------------------------------- checkpoints

def training_checkpoint(model, optimizer, schedule, scaler, state, ctx, model_args, rng_states, ema=None):
    return {"format": 1, "model": strip_prefixes(model.state_dict()), "model_args": model_args,
            "ema": ema.state_dict() if ema is not None else None,
            "data_info": ctx.info.to_dict(), "config": to_plain(ctx.cfg), "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(), "epoch": state.epoch,
            "step_in_epoch": state.step, "epoch_sums": list(state.sums), "partial_time": state.partial_time,
            "history": list(state.history), "best_val_acc": state.best_val_acc, "bad_epochs": state.bad_epochs,
            "rng": rng_states, "world_size": ctx.world}


def weights_checkpoint(model, state, ctx, model_args, ema=None):
    """Self-describing weights (best, final): enough for infer.py and --eval, nothing to resume.
    With train.ema the averaged weights go beside the raw ones, as `ema_model`."""
    return {"format": 1, "model": strip_prefixes(model.state_dict()), "model_args": model_args,
            **({"ema_model": strip_prefixes(ema.module.state_dict())} if ema is not None else {}),
            "data_info": ctx.info.to_dict(), "config": to_plain(ctx.cfg), "epoch": state.epoch,
            "history": list(state.history)}


def gather_rng(ctx):
    """Every rank's RNG state (dropout draws differ per rank), gathered to all ranks."""
    mine = get_rng_state(ctx.device)
    if ctx.world == 1:
        return [mine]
    out = [None] * ctx.world
    dist.all_gather_object(out, mine)
    return out


def resume_requested(cfg):
    """True / False / 'auto' -> whether to look for a checkpoint. A torchrun restart (after a
    worker died) always resumes, or its epochs would be run twice."""
    mode = cfg.checkpoint.resume
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    return mode is True or mode == "auto" or restarted, mode is True


def check_same_run(path, ckpt, model_args, dataset):
    """A checkpoint of another model or data set (a reused checkpoint.dir) would not load, or
    would silently train on the wrong labels: stop with the keys that differ. Dropout and drop
    path may change between the legs of a run."""
    old_args, old_data = ckpt.get("model_args") or {}, (ckpt.get("data_info") or {}).get("dataset", dataset)
    diff = [f"model.{k}={old_args[k]!r} there, {model_args[k]!r} now" for k in sorted(model_args)
            if k in old_args and old_args[k] != model_args[k] and k not in ("dropout", "drop_path")]
    if old_data != dataset:
        diff.insert(0, f"data.dataset={old_data} there, {dataset} now")
    if diff:
        raise UserError(f"checkpoint '{path}' is from another run ({'; '.join(diff)}); resume with that run's "
                        f"config, or set checkpoint.dir to a new folder or checkpoint.resume=false")


def try_resume(cfg, ctx, model, model_args, optimizer, schedule, scaler, state, ema=None):
    """Load the newest valid checkpoint (rank 0 picks it; all ranks load the same file)."""
    wanted, required = resume_requested(cfg)
    if not wanted:
        return None
    found = find_resume_checkpoint(cfg.checkpoint.dir, cfg.checkpoint.resume_epoch, ctx.logger) if ctx.rank == 0 else None
    path = found[0] if found else None
    if ctx.world > 1:
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    if path is None:
        if required:
            raise UserError(f"checkpoint.resume=true but {cfg.checkpoint.dir} holds no readable checkpoint; "
                            f"train without checkpoint.resume=true, or set checkpoint.dir")
        return None
    ckpt = found[1] if found else load_checkpoint(path)
    check_same_run(path, ckpt, model_args, ctx.info.dataset)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema"):
        ema.load_state_dict(ckpt["ema"])
    elif ema is not None:  # EMA switched on mid-run: start the average from the resumed weights
        ema.restart()
        ctx.logger.warning("the checkpoint holds no EMA weights (train.ema was off); the EMA starts from its weights")
    state.epoch, state.step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
    state.sums = list(ckpt["epoch_sums"]) if ctx.rank == 0 else [0.0, 0.0, 0.0]
    state.partial_time = float(ckpt["partial_time"])
    state.history, state.best_val_acc = list(ckpt["history"]), float(ckpt["best_val_acc"])
    state.bad_epochs = int(ckpt["bad_epochs"])
    rng = ckpt.get("rng") or []
    if len(rng) == ctx.world:
        set_rng_state(rng[ctx.rank], ctx.device)
    else:
        seed_everything(cfg.train.seed + 1000 * state.epoch + ctx.rank)
    if ctx.world != int(ckpt.get("world_size", 1)):
        ctx.logger.info(f"checkpoint was written by {ckpt.get('world_size')} rank(s); continuing on {ctx.world}")
    rebase_to_global_batch(ckpt, cfg.train, ctx.world, schedule, state, ctx.logger)
    return path


def rebase_to_global_batch(ckpt, tcfg, world, schedule, state, logger):
    """A checkpoint counts steps of the global batch it was written with. When the world size or
    batch size changed, re-express the position in the epoch and the LR schedule in the new
    global batches, or the schedule would end early or late. With the same global batch nothing
    changes, and the continuation is the same run up to floating-point order."""
    old = ckpt.get("config", {}).get("train", {})
    old_global = int(old.get("batch_size", tcfg.batch_size)) * int(ckpt.get("world_size", 1))
    new_global = tcfg.batch_size * world
    if old_global == new_global and int(old.get("grad_accum", tcfg.grad_accum)) == tcfg.grad_accum:
        return
    step = state.step * old_global // new_global  # round down: repeat a few images rather than skip them
    state.step = step - step % tcfg.grad_accum  # optimizer steps start on an accumulation boundary
    schedule.load_state_dict({"step_count": state.epoch * schedule.spe + state.step // tcfg.grad_accum})
    logger.warning(f"checkpoint was written with a global batch of {old_global}, continuing with {new_global}: "
                   f"resuming at step {state.step} of epoch {state.epoch + 1}, lr schedule at step {schedule.step_count}")


# --------------------------------------------------------------------------------------------- run

def setup(cfg, args, rank, world, local_rank):
    """Process group, device, logging, threads. Returns (device, logger)."""
    device = resolve_device(cfg.train.device, args.no_mps, local_rank)
    init_distributed(cfg, device, rank, world)
    logger = setup_logging(cfg.log.dir, rank, cfg.log.level)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # unset in a PyTorchJob pod: one process per pod
    if device.type == "cpu" and local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # no oversubscription
    return device, logger


def run_eval(cfg, args, rank, world, local_rank):
    path = args.checkpoint or newest_final(cfg.checkpoint.dir)
    if path is None:
        raise UserError(f"--eval needs --checkpoint PATH (no *_final.pth in {cfg.checkpoint.dir})")
    model, ckpt, kind = load_trained(path)  # a bad file stops here, before any process group
    device, logger = setup(cfg, args, rank, world, local_rank)
    info_d, margs = ckpt["data_info"], ckpt["model_args"]
    dcfg = OmegaConf.merge(cfg.data, {"dataset": info_d["dataset"], "train_limit": 1})
    _, test, info = load_data(dcfg, margs["image_size"], device, logger)
    info.mean, info.std, info.classes = tuple(info_d["mean"]), tuple(info_d["std"]), info_d["classes"]
    model.to(device)
    ctx = RunCtx(cfg, device, rank, world, info, amp_dtype_for(cfg.train.amp, device), 0, logger)
    res = evaluate(model, test, ctx, margs["image_size"], cfg.train.eval_batch_size)
    if rank == 0:
        print(f"Checkpoint: {path} ({kind} weights)")
        print(f"Total Samples: {res['n']}")
        print(f"Global Average Loss: {res['loss']:.4f}")
        print(f"Global Accuracy: {100 * res['acc']:.2f}%")
        cm = res["confusion"]
        for c, name in enumerate(info.classes):
            total = int(cm[c].sum())
            acc = f"{100 * int(cm[c, c]) / total:.2f}%" if total else "n/a"
            print(f"  class {name:>12}: {acc} of {total}")
        out = os.path.splitext(path)[0] + "_confusion.png"
        plot_confusion(cm, info.classes, f"{os.path.basename(path)}: {100 * res['acc']:.2f}% of {res['n']}", out)
        print(f"Confusion matrix: {out}")
    return 0


def count_steps(n_train, global_batch):
    """Whole global batches per epoch (the last partial one is dropped, so every rank's slice of a
    step has the same size)."""
    if n_train < global_batch:
        raise UserError(f"the training set has {n_train} images, fewer than one batch of {global_batch} "
                        f"(train.batch_size * world size); lower train.batch_size or raise data.train_limit")
    return n_train // global_batch


def build_training(cfg, ctx, model_args):
    """Model (raw and, with train.compile, compiled), optimizer, LR schedule and grad scaler of one
    rank. bench.py builds through here too, so it measures exactly what train.py runs."""
    tcfg = cfg.train
    seed_everything(tcfg.seed)  # the same initial weights on every rank
    raw_model = build_model(model_args).to(ctx.device)
    lr = tcfg.lr * (ctx.world * tcfg.grad_accum if tcfg.scale_lr else 1)
    optimizer = build_optimizer(raw_model, tcfg, lr, ctx.device)
    opt_steps_per_epoch = math.ceil(ctx.steps_per_epoch / tcfg.grad_accum)
    schedule = Schedule(optimizer, lr, tcfg.epochs * opt_steps_per_epoch, opt_steps_per_epoch, tcfg)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
    seed_everything(tcfg.seed + ctx.rank)  # dropout draws differ per rank
    model = torch.compile(raw_model) if tcfg.compile else raw_model
    ema = ModelEMA(raw_model, tcfg.ema_decay, tcfg.ema_warmup) if tcfg.ema else None
    return raw_model, model, optimizer, schedule, scaler, ema


def run_train(cfg, args, rank, world, local_rank):
    device, logger = setup(cfg, args, rank, world, local_rank)
    tcfg = cfg.train
    train, test, info = load_data(cfg.data, cfg.model.image_size, device, logger)
    global_batch = tcfg.batch_size * world
    steps_per_epoch = count_steps(len(train), global_batch)
    ctx = RunCtx(cfg, device, rank, world, info, amp_dtype_for(tcfg.amp, device), steps_per_epoch, logger)
    model_args = model_args_from_config(cfg.model, info.in_channels, len(info.classes))
    raw_model, model, optimizer, schedule, scaler, ema = build_training(cfg, ctx, model_args)
    state = TrainState()
    resumed = try_resume(cfg, ctx, raw_model, model_args, optimizer, schedule, scaler, state, ema)
    if rank == 0:
        os.makedirs(cfg.checkpoint.dir, exist_ok=True)
        atomic_write_bytes(os.path.join(cfg.log.dir, "config.yaml"), _yaml(cfg))
        metrics = os.path.join(cfg.log.dir, "metrics.jsonl")
        if resumed:
            write_metrics(metrics, state.history)  # drop lines of epochs the checkpoint does not hold
        elif os.path.exists(metrics) and os.path.getsize(metrics):
            os.replace(metrics, os.path.join(cfg.log.dir, f"metrics.{timestamp()}.jsonl"))
    nparams = sum(p.numel() for p in raw_model.parameters())
    logger.info(f"{info.dataset}: {len(train)} train / {len(test)} test images on {device}, world size {world}; "
                f"{model_args['name']} with {nparams / 1e6:.2f}M parameters; global batch {global_batch}, "
                f"{steps_per_epoch} steps/epoch" + (f"; resumed from {resumed} (epoch {state.epoch}, step {state.step})" if resumed else ""))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loggers = Loggers(cfg, logger, rank == 0)
    stop = StopSignal()
    stop.install()
    try:
        return _train_loop(cfg, ctx, raw_model, model, optimizer, schedule, scaler, ema, state, train, test, loggers,
                           stop, model_args)
    finally:
        stop.uninstall()
        loggers.close()


def _train_loop(cfg, ctx, raw_model, model, optimizer, schedule, scaler, ema, state, train, test, loggers, stop,
                model_args):
    """Epochs until done, early-stopped or signalled; rank 0 writes checkpoints, metrics and curves."""
    tcfg, rank, world, device, logger, info = cfg.train, ctx.rank, ctx.world, ctx.device, ctx.logger, ctx.info
    steps_per_epoch, global_batch = ctx.steps_per_epoch, tcfg.batch_size * world
    final_name = final_weights_name(info.dataset, model_args["name"])
    interrupted = False
    while state.epoch < tcfg.epochs:
        epoch = state.epoch + 1
        bar = _progress(rank, epoch, tcfg.epochs, steps_per_epoch, state.step)
        t0 = time.perf_counter()
        start_step = state.step
        interrupted = train_one_epoch(model, optimizer, schedule, scaler, train, ctx, state, stop, bar, ema)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seg_time = time.perf_counter() - t0
        state.partial_time += seg_time
        if bar is not None:
            bar.close()
        if interrupted:
            path = os.path.join(cfg.checkpoint.dir, epoch_ckpt_name(state.epoch, state.step))
            rng = gather_rng(ctx)
            if rank == 0:
                atomic_write_bytes(path, serialize(training_checkpoint(raw_model, optimizer, schedule, scaler, state,
                                                                       ctx, model_args, rng, ema)))
                logger.info(f"stopped by signal at epoch {epoch}, step {state.step}/{steps_per_epoch}; saved {path}. "
                            f"Continue with checkpoint.resume=true")
            break
        t1 = time.perf_counter()
        val = evaluate(raw_model, test, ctx, cfg.model.image_size, tcfg.eval_batch_size)
        ema_val = evaluate(ema.module, test, ctx, cfg.model.image_size, tcfg.eval_batch_size) if ema else None
        loss_sum, correct, n = state.sums
        record = {"epoch": epoch, "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
                  "val_loss": val["loss"], "val_acc": val["acc"],
                  **({"ema_val_loss": ema_val["loss"], "ema_val_acc": ema_val["acc"]} if ema else {}),
                  "lr": schedule.lr(),
                  "epoch_time_s": round(state.partial_time, 3),
                  "images_per_s": round((steps_per_epoch - start_step) * global_batch / max(seg_time, 1e-9), 1),
                  "eval_time_s": round(time.perf_counter() - t1, 3), "world_size": world}
        score = ema_val["acc"] if ema else val["acc"]  # best.pth and early stopping follow what infer.py uses
        improved = score > state.best_val_acc + tcfg.early_stop_min_delta
        state.history.append(record)
        state.epoch, state.step, state.sums, state.partial_time = epoch, 0, [0.0, 0.0, 0.0], 0.0
        if improved:
            state.best_val_acc, state.bad_epochs = score, 0
        else:
            state.bad_epochs += 1
        early = tcfg.early_stop_patience > 0 and state.bad_epochs >= tcfg.early_stop_patience
        last = epoch == tcfg.epochs or early
        save = epoch % cfg.checkpoint.save_every == 0 or last
        rng = gather_rng(ctx) if save else None
        if rank == 0:
            if save:  # the checkpoint first: metrics.jsonl is rebuilt from it on resume
                blob = serialize(training_checkpoint(raw_model, optimizer, schedule, scaler, state, ctx, model_args, rng,
                                                     ema))
                atomic_write_bytes(os.path.join(cfg.checkpoint.dir, epoch_ckpt_name(epoch)), blob)
                prune_checkpoints(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
            if improved:
                atomic_write_bytes(os.path.join(cfg.checkpoint.dir, "best.pth"),
                                   serialize(weights_checkpoint(raw_model, state, ctx, model_args, ema)))
            loggers.epoch(record)
            plot_curves(state.history, os.path.join(cfg.checkpoint.dir, "training_curves.png"))
            logger.info(f"epoch {epoch}/{tcfg.epochs} train_loss {record['train_loss']:.4f} train_acc "
                        f"{record['train_acc']:.4f} val_loss {record['val_loss']:.4f} val_acc {record['val_acc']:.4f} "
                        + (f"ema_val_acc {record['ema_val_acc']:.4f} " if ema else "")
                        + f"lr {record['lr']:.2e} {record['epoch_time_s']:.1f}s {record['images_per_s']:.0f} img/s")
        if early:
            logger.info(f"early stop: val_acc has not improved by {tcfg.early_stop_min_delta} for "
                        f"{state.bad_epochs} epochs")
            break
        if epoch < tcfg.epochs and stop.agreed(device, world):
            interrupted = True
            logger.info(f"stopped by signal after epoch {epoch}; continue with checkpoint.resume=true")
            break
    if not interrupted and rank == 0:
        path = os.path.join(cfg.checkpoint.dir, final_name)
        atomic_write_bytes(path, serialize(weights_checkpoint(raw_model, state, ctx, model_args, ema)))
        if state.history:
            plot_curves(state.history, os.path.join(cfg.checkpoint.dir, "training_curves.png"))
            key = "ema_val_acc" if ema else "val_acc"
            best = max(r.get(key, r["val_acc"]) for r in state.history)
            logger.info(f"done: final {key} {state.history[-1].get(key, 0.0):.4f} (best {best:.4f}); weights in {path}")
    # In a PyTorchJob a pod that exits 0 counts as done, and a done Master ends the job: a preempted
    # run exits 143 (128 + SIGTERM) there, so that the operator restarts the pods and they resume.
    return 143 if interrupted and cfg.environment == "k8s" else 0


def _yaml(cfg):
    return OmegaConf.to_yaml(cfg).encode()


def _progress(rank, epoch, epochs, total, initial):
    if rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)


def run(args, rank, world, local_rank):
    """One worker: the same for 1 process, --num-gpus, torchrun and a PyTorchJob pod."""
    try:
        cfg = config_from_args(args)
        code = (run_eval if args.eval else run_train)(cfg, args, rank, world, local_rank)
        leave_group(rank, world, cfg.distributed.timeout_s)
        return code
    except UserError as e:
        print(f"error: {e}" if world == 1 else f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return e.code
    except Exception as e:
        if not lost_peer(e, world):
            raise
        print(f"error (rank {rank}): another rank failed or stopped answering ({str(e).splitlines()[0][:160]}); "
              f"its own error, printed above or in its log, is the cause", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        _GROUP.clear()


def lost_peer(e, world):
    """A collective that failed because another rank died or hung: not a bug of this rank."""
    markers = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out")
    return world > 1 and (isinstance(e, getattr(dist, "DistError", ())) or any(m in str(e) for m in markers))


def config_from_args(args):
    cfg = load_config(args.config, args.overrides)
    if args.no_cuda and cfg.train.device == "cuda":
        raise UserError("--no-cuda contradicts train.device=cuda; drop one of them")
    if args.no_cuda and cfg.train.device == "auto":
        cfg = load_config(args.config, args.overrides, {"train": {"device": "cpu"}})
    return cfg


# ----------------------------------------------------------------------------------- --num-gpus N

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank, world, port, args):
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    code = run(args, local_rank, world, local_rank)
    if code:
        sys.exit(code)


def launch_local(args, cfg):
    import torch.multiprocessing as mp

    n = args.num_gpus
    device = resolve_device(cfg.train.device, args.no_mps)
    if device.type == "cuda" and torch.cuda.device_count() < n:
        raise UserError(f"--num-gpus {n} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; use "
                        f"--num-gpus {torch.cuda.device_count()}, or add train.device=cpu for {n} CPU workers on gloo")
    if device.type == "mps" and n > 1:
        raise UserError("MPS cannot run more than one process; drop --num-gpus, or add train.device=cpu")
    if device.type == "cpu" and cfg.train.device != "cpu":
        raise UserError(f"--num-gpus {n} but no GPU is visible; add train.device=cpu to run {n} CPU workers on gloo")
    port = cfg.distributed.master_port or _free_port()
    procs = mp.start_processes(_spawned, args=(n, port, args), nprocs=n, join=False, start_method="spawn")

    def forward(signum, frame):  # preemption of the launcher reaches every worker
        for p in procs.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not procs.join():
            pass
    except mp.ProcessExitedException as e:
        print(f"error: worker {e.error_index} exited with code {e.exit_code}; the other workers were stopped",
              file=sys.stderr)
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        print(f"error: a worker failed; the other workers were stopped:\n{e}", file=sys.stderr)
        return 1
    finally:  # main() may be called in-process (tests): give Ctrl-C back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)  # a bad config stops here, before any worker starts
        if args.checkpoint and not args.eval:
            raise UserError("--checkpoint is for --eval; to continue training use checkpoint.resume=true")
        if args.num_gpus < 0:
            raise UserError(f"--num-gpus {args.num_gpus} must be >= 1")
        rank, world, local_rank = dist_env(args)
        if args.num_gpus and world > 1:
            raise UserError("--num-gpus cannot be used under torchrun or a PyTorchJob; the launcher already started the workers")
        resolve_device(cfg.train.device, args.no_mps)  # e.g. train.device=cuda on a machine without one
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    if args.num_gpus:
        try:
            return launch_local(args, cfg)
        except UserError as e:  # too few GPUs, MPS: before any worker starts
            print(f"error: {e}", file=sys.stderr)
            return e.code
    return run(args, rank, world, local_rank)


if __name__ == "__main__":
    exit_with(main)
