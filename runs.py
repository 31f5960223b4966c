"""A run's folders and what it leaves in them.

Each run writes to its own `<checkpoint.dir>/<run>/` and `<log.dir>/<run>/` (`run.name`, or
`<dataset>-<model>-<start time>`), so a second run never touches the first one's files;
`<checkpoint.dir>/latest` names the newest run. Rank 0 holds an OS lock on the run's checkpoint
folder while it writes there. In the log folder: train.log, metrics.jsonl (one line per epoch),
config.yaml (the config the run started with), config_history.jsonl (what each resume changed),
summary.json (the test result at the end) and tensorboard/; in the checkpoint folder, beside the
checkpoints: training_curves.png. Without a terminal, progress lines with the ETA go to the log.
"""
import contextlib
import io
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass

from omegaconf import OmegaConf

from checkpoint import list_checkpoints, resume_requested, restarts
from launch import EXIT_RUN_BUSY
from utils import (UserError, append_line, atomic_write_bytes, log_to_file, timestamp, to_plain, write_metrics)

# -------------------------------------------------------------------------------- run folders

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
LATEST = "latest"


@dataclass
class RunDir:
    """Where one run writes, and whether it continues from a checkpoint there."""
    name: str
    ckpt: str           # <checkpoint.dir>/<name>
    log: str            # <log.dir>/<name>
    resume: bool        # look for a checkpoint to continue from
    required: bool      # ... and fail when there is none


def read_latest(ckpt_root):
    """The run named by <checkpoint.dir>/latest, or None."""
    try:
        with open(os.path.join(ckpt_root, LATEST)) as f:
            name = f.read().strip()
    except OSError:
        return None
    return name if RUN_NAME.fullmatch(name) and os.path.isdir(os.path.join(ckpt_root, name)) else None


def _has_records(path_ckpt, path_log):
    return bool(list_checkpoints(path_ckpt)) or os.path.isfile(os.path.join(path_log, "metrics.jsonl"))


def _new_name(cfg):
    """<dataset>-<model>-<start time>, with -2, -3 ... when two runs start in the same second."""
    base = f"{cfg.data.dataset}-{cfg.model.name}-{timestamp()}"
    name, n = base, 1
    while os.path.exists(os.path.join(cfg.checkpoint.dir, name)) or os.path.exists(os.path.join(cfg.log.dir, name)):
        n += 1
        name = f"{base}-{n}"
    return name


def choose_run(cfg, logger):
    """The run folder from run.name, checkpoint.resume and a torchrun restart (rank 0 decides):
    resume=true or a restart continues run.name, else the newest run; auto continues run.name
    when it has a checkpoint; anything else starts a new run."""
    name, root = cfg.run.name, cfg.checkpoint.dir
    if name and not RUN_NAME.fullmatch(name):
        raise UserError(f"run.name={name!r} is not a folder name; use letters, digits, '.', '_' and '-' "
                        f"(at most 100, starting with a letter or digit)")
    wanted, required = resume_requested(cfg)
    if wanted and not name and (required or restarts() > 0):
        name = read_latest(root)
        if name is None and required:
            raise UserError(f"checkpoint.resume=true but {root} holds no run to continue (no '{LATEST}'); "
                            f"train without checkpoint.resume=true, or set run.name to the run's folder")
    elif wanted and not name and cfg.environment == "k8s":
        logger.warning("environment=k8s without run.name: a restarted pod cannot find its run and starts a new "
                       "one; set run.name (the manifests pass the PyTorchJob's name)")
    run = RunDir(name or _new_name(cfg), "", "", wanted and bool(name), required)
    run.ckpt, run.log = os.path.join(root, run.name), os.path.join(cfg.log.dir, run.name)
    if not run.resume and _has_records(run.ckpt, run.log):
        raise UserError(f"run '{run.name}' already has records in {run.ckpt} and {run.log}; continue it with "
                        f"checkpoint.resume=true, or choose another run.name")
    return run


def config_changes(old, new):
    """{dotted key: [old, new]} for the keys a resume changed, bookkeeping keys left out."""
    def leaves(node, prefix=""):
        for k, v in (node or {}).items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    before, after = dict(leaves(old)), dict(leaves(new))
    skip = {"checkpoint.resume", "checkpoint.resume_epoch", "run.name", "checkpoint.dir", "log.dir"}  # where, not how
    return {k: [before.get(k), v] for k, v in after.items() if k not in skip and before.get(k) != v}


class RunLock:
    """An OS lock on a run's checkpoint folder, held by rank 0 while the run writes there; the OS
    releases it when the process ends, however it ends. The holder is written into the file so
    that a refused run can say who holds it."""

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, ".lock")
        self.file = open(self.path, "a+")  # a+: a finished run's lock file is not changed by a look
        try:
            _lock(self.file)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"run folder {folder} is in use by {holder}; wait for that run to end, or choose "
                            f"another run.name", code=EXIT_RUN_BUSY) from None

    def claim(self):
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self, run):
        """Drop the lock; a run that ended before writing anything leaves no empty folders behind."""
        if self.file.closed:
            return
        self.file.close()  # closing drops the lock
        if set(os.listdir(run.ckpt)) <= {".lock"} and not (os.path.isdir(run.log) and os.listdir(run.log)):
            with contextlib.suppress(OSError):
                os.remove(self.path)
                os.rmdir(run.ckpt)
                os.rmdir(run.log)


def _lock(f):
    try:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows
        import msvcrt
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)


def point_latest(ckpt_root, name):
    atomic_write_bytes(os.path.join(ckpt_root, LATEST), (name + "\n").encode())


def open_outputs(cfg, run, state, resumed_config, logger):
    """Rank 0, once the run will train: its train.log, the `latest` pointer, the config (or, on a
    resume, the changes to it) and a metrics.jsonl that holds exactly the epochs done."""
    log_to_file(logger, os.path.join(run.log, "train.log"))
    point_latest(cfg.checkpoint.dir, run.name)
    metrics = os.path.join(run.log, "metrics.jsonl")
    if resumed_config is None:
        atomic_write_bytes(os.path.join(run.log, "config.yaml"), OmegaConf.to_yaml(cfg).encode())
        if os.path.exists(metrics) and os.path.getsize(metrics):  # records without a checkpoint: keep them aside
            os.replace(metrics, os.path.join(run.log, f"metrics.{timestamp()}.jsonl"))
        return
    write_metrics(metrics, state.history)  # drop lines of epochs the checkpoint does not hold
    changes = config_changes(resumed_config, to_plain(cfg))
    if changes:  # config.yaml keeps the run's first config; each resume's changes are appended here
        append_line(os.path.join(run.log, "config_history.jsonl"),
                    json.dumps({"time": timestamp(), "from_epoch": state.epoch, "changes": changes}))
        logger.info("resumed with " + ", ".join(f"{k}={new!r} (was {old!r})" for k, (old, new) in changes.items()))



class Progress:
    """Rank 0's view of the epoch in progress: a tqdm bar on a terminal, updated every
    train.log_interval steps; without one (a pod log, `> file`) a log line every log.progress_s
    seconds with the loss, the speed and the ETA of the epoch and of the run. The loss is read
    from the device only when it is shown."""

    def __init__(self, ctx, state):
        self.ctx, self.epoch, self.start = ctx, state.epoch + 1, state.step
        self.t0 = self.last = time.monotonic()
        self.eval_s = state.history[-1].get("eval_time_s", 0.0) if state.history else 0.0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=ctx.steps_per_epoch, initial=state.step, leave=False, dynamic_ncols=True,
                            desc=f"epoch {self.epoch}/{ctx.cfg.train.epochs}")

    def update(self, step, sums, lr):
        if self.bar is not None:
            if step % self.ctx.cfg.train.log_interval == 0:
                self.bar.update(step - self.bar.n)
                self.bar.set_postfix(loss=f"{(sums[0] / sums[2].clamp_min(1)).item():.4f}", lr=f"{lr:.2e}")
            return
        every, now = self.ctx.cfg.log.progress_s, time.monotonic()
        if every and now - self.last >= every and step > self.start:
            self.last = now
            self.ctx.logger.info(self.line(step, float(sums[0] / sums[2].clamp_min(1)), lr, now))

    def line(self, step, loss, lr, now):
        ctx, epochs = self.ctx, self.ctx.cfg.train.epochs
        global_batch = ctx.cfg.train.batch_size * ctx.world
        speed = (step - self.start) * global_batch / max(now - self.t0, 1e-9)
        epoch_left = (ctx.steps_per_epoch - step) * global_batch / speed
        run_left = epoch_left + self.eval_s + (epochs - self.epoch) * (ctx.steps_per_epoch * global_batch / speed
                                                                       + self.eval_s)
        return (f"epoch {self.epoch}/{epochs} step {step}/{ctx.steps_per_epoch} loss {loss:.4f} lr {lr:.2e} "
                f"{speed:.0f} img/s; ETA epoch {_clock(epoch_left)}, run {_clock(run_left)}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------- plots

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
    for i, key in enumerate(("loss", "acc")):
        ax[i].plot(ep, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax[i].plot(ep, [r[f"val_{key}"] for r in history], "o-", label="val")
        ax[i].set_title("loss" if key == "loss" else "accuracy")
        ax[i].legend()
    ax[2].plot(ep, [r["lr"] for r in history], "o-")
    ax[2].set_title("learning rate (end of epoch)")
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
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
    """Rank 0's record of the run: metrics.jsonl, TensorBoard, SwanLab, the curves, the summary and
    the log lines. Other ranks hold a disabled one."""

    def __init__(self, cfg, run, logger, enabled):
        self.cfg, self.run, self.logger, self.enabled, self.tb, self.swan = cfg, run, logger, enabled, None, None
        self.metrics_path = os.path.join(run.log, "metrics.jsonl")
        self.curves_path = os.path.join(run.ckpt, "training_curves.png")
        if enabled and cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run.log, "tensorboard"))
            except ImportError:
                logger.warning("log.tensorboard=true but tensorboard is not installed; pip install tensorboard, "
                               "or set log.tensorboard=false")
        if enabled and cfg.log.swanlab:
            try:
                import swanlab
                self.swan = swanlab.init(project=cfg.log.swanlab_project, config=to_plain(cfg))
            except ImportError:
                logger.warning("log.swanlab=true but swanlab is not installed; pip install swanlab, "
                               "or set log.swanlab=false")

    def epoch(self, record, history):
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
        plot_curves(history, self.curves_path)
        r = record
        self.logger.info(f"epoch {r['epoch']}/{self.cfg.train.epochs} train_loss {r['train_loss']:.4f} train_acc "
                         f"{r['train_acc']:.4f} val_loss {r['val_loss']:.4f} val_acc {r['val_acc']:.4f} "
                         + (f"ema_val_acc {r['ema_val_acc']:.4f} " if "ema_val_acc" in r else "")
                         + f"lr {r['lr']:.2e} {r['epoch_time_s']:.1f}s {r['images_per_s']:.0f} img/s")

    def done(self, state, test, path, weights):
        """The end of a run: summary.json with the test result of the final weights, and the last lines."""
        if not self.enabled:
            return
        key = "ema_val_acc" if weights == "EMA" else "val_acc"
        summary = {"run": self.run.name, "epochs": state.epoch, "final_weights": path, "weights": weights,
                   "best_" + key: state.best_val_acc, "final": state.history[-1], **test}
        atomic_write_bytes(os.path.join(self.run.log, "summary.json"), (json.dumps(summary, indent=1) + "\n").encode())
        self.logger.info(f"done: final {key} {state.history[-1][key]:.4f} (best {state.best_val_acc:.4f}); "
                         f"test: loss {test['test_loss']:.4f} acc {test['test_acc']:.4f} on {test['test_images']} "
                         f"images ({weights} weights); weights in {path}")

    def close(self):
        if self.tb is not None:
            self.tb.close()
