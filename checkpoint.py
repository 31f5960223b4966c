"""Everything a checkpoint is: what goes in it, when it is written, which run folder a run writes
to and resumes from, how it checks and loads one, and how infer.py and `--eval` rebuild a trained
model from one file.

Each run has its own folders, `<checkpoint.dir>/<run>/` and `<log.dir>/<run>/`, so a second run
never touches the first one's files; `<checkpoint.dir>/latest` names the newest run.

Two kinds of file, both written atomically (temporary name, fsync, rename):
- training checkpoints `epoch_NNN.pt` (and `epoch_NNN_stepSSSSSS.pt` when stopped mid-epoch):
  weights, optimizer, schedule, scaler, EMA, the position in the epoch, the history and the RNG
  state of every rank, so a resumed run continues exactly;
- weights files `best.pth` and `<dataset>_transformer_final.pth`: weights with `model_args`,
  `data_info` and `config`, enough to rebuild the model and nothing to resume.
Loads use `torch.load(weights_only=True)`: a checkpoint cannot run code.

load_trained() also reads what `export.py --format safetensors` writes (model.json beside
model.safetensors), so infer.py and `--eval` run an export like a checkpoint.
"""
import io
import json
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from launch import from_rank0
from model import MODEL_NAMES, build_model, preferred_weights, strip_prefixes, transfer_weights
from utils import UserError, atomic_write_bytes, read_safetensors, seed_everything, to_plain

FORMAT = 1


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


# ------------------------------------------------------------------------------------- files

def serialize(payload):
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def save_checkpoint(path, payload):
    atomic_write_bytes(path, serialize(payload))


def load_checkpoint(path, map_location="cpu"):
    """weights_only=True: a checkpoint holds tensors and plain values, and cannot run code."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' not found; pass an existing .pt/.pth file with --checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"it is truncated or not a checkpoint of this toolkit", code=1) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"checkpoint '{path}' has no 'model' entry; it was not written by this toolkit", code=1)
    return ckpt


def epoch_ckpt_name(epoch, step=0):
    """epoch_003.pt after epoch 3; epoch_003_step000120.pt: 120 steps into epoch 4, after epoch 3."""
    return f"epoch_{epoch:03d}.pt" if step == 0 else f"epoch_{epoch:03d}_step{step:06d}.pt"


def final_weights_name(dataset, model_name):
    """`mnist_transformer_final.pth` for the default ViT; `cifar10_resnet_final.pth` and the like."""
    tag = "transformer" if model_name == "vit" else model_name
    return f"{dataset}_{tag}_final.pth"


def list_checkpoints(ckpt_dir):
    """Resumable checkpoints, newest first (by modification time, so a fresh run in a folder
    that holds an older run's files still resumes from its own newest)."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = [n for n in os.listdir(ckpt_dir) if n.startswith("epoch_") and n.endswith(".pt")]
    paths = [os.path.join(ckpt_dir, n) for n in names]
    return sorted(paths, key=lambda p: (os.stat(p).st_mtime_ns, p), reverse=True)


def find_resume_checkpoint(ckpt_dir, resume_epoch, logger):
    """(path, checkpoint) to resume from, skipping unreadable ones with a warning; None if none."""
    candidates = list_checkpoints(ckpt_dir)
    if resume_epoch >= 0:
        candidates = [p for p in candidates if os.path.basename(p) == epoch_ckpt_name(resume_epoch)]
        if not candidates:
            raise UserError(f"checkpoint.resume_epoch={resume_epoch}: no {epoch_ckpt_name(resume_epoch)} in "
                            f"{ckpt_dir}; use checkpoint.resume_epoch=-1 for the newest")
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            if "optimizer" not in ckpt or "epoch" not in ckpt:
                raise UserError(f"checkpoint '{path}' holds weights only, not a training state")
            return path, ckpt
        except UserError as e:
            logger.warning(f"skipping checkpoint: {e}")
    return None


def prune_checkpoints(ckpt_dir, keep_last):
    """Keep the newest `keep_last` end-of-epoch checkpoints; mid-epoch ones are superseded by
    the next end-of-epoch checkpoint and go too."""
    epoch_ckpts = [p for p in list_checkpoints(ckpt_dir) if "_step" not in os.path.basename(p)]
    stale = epoch_ckpts[keep_last:] + [p for p in list_checkpoints(ckpt_dir) if "_step" in os.path.basename(p)]
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def newest_final(folder):
    """The newest `*_final.pth` in `folder` or in its run folders (one level down), or None: the
    newest run's final weights under checkpoint.dir, or a run's own when given its folder."""
    if not os.path.isdir(folder):
        return None
    finals = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith("_final.pth") and os.path.isfile(path):
            finals.append(path)
        elif os.path.isdir(path):
            finals += [os.path.join(path, n) for n in os.listdir(path) if n.endswith("_final.pth")]
    return max(finals, key=lambda p: os.stat(p).st_mtime_ns) if finals else None


# ---------------------------------------------------------------------------------- RNG state

def get_rng_state(device):
    np_state = np.random.get_state()
    py = random.getstate()
    state = {
        "python": list(py[1]) + [py[0], py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def gather_rng(device, world):
    """Every rank's RNG state (dropout draws differ per rank), gathered to all ranks."""
    mine = get_rng_state(device)
    if world == 1:
        return [mine]
    out = [None] * world
    dist.all_gather_object(out, mine)
    return out


# ---------------------------------------------------------------------------------- resuming

def restarts():
    """How often torchrun has restarted this group after a worker died (0 outside torchrun)."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def resume_requested(cfg):
    """(look for a checkpoint, one is required). A torchrun restart (after a worker died) always
    resumes, or its epochs would be run twice."""
    mode = cfg.checkpoint.resume
    return mode is True or mode == "auto" or restarts() > 0, mode is True


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
                        f"config, or start a new run (drop checkpoint.resume, or choose another run.name)")


def rebase_to_global_batch(ckpt, tcfg, world, schedule, state):
    """A checkpoint counts steps of the global batch it was written with. When the world size or
    batch size changed, re-express the position in the epoch and the LR schedule in the new
    global batches, or the schedule would end early or late. Returns a warning, or None when the
    global batch is the same and nothing changed."""
    old = ckpt.get("config", {}).get("train", {})
    old_global = int(old.get("batch_size", tcfg.batch_size)) * int(ckpt.get("world_size", 1))
    new_global = tcfg.batch_size * world
    if old_global == new_global and int(old.get("grad_accum", tcfg.grad_accum)) == tcfg.grad_accum:
        return None
    step = state.step * old_global // new_global  # round down: repeat a few images rather than skip them
    state.step = step - step % tcfg.grad_accum  # optimizer steps start on an accumulation boundary
    schedule.load_state_dict({"step_count": state.epoch * schedule.spe + state.step // tcfg.grad_accum})
    return (f"checkpoint was written with a global batch of {old_global}, continuing with {new_global}: "
            f"resuming at step {state.step} of epoch {state.epoch + 1}, lr schedule at step {schedule.step_count}")


def load_optimizer(optimizer, saved):
    """optimizer.load_state_dict, keeping the implementation this run chose for its device. The saved
    param_groups carry the writer's `fused`/`foreach`/`capturable`: a CPU checkpoint resumed on CUDA
    would run the unfused loop (and fail under the fp16 grad scaler, which hands a fused optimizer its
    scale), a CUDA one resumed on the CPU the fused kernel. The step counts go where the chosen one
    keeps them: on the parameter's device when fused or capturable, else on the CPU."""
    chosen = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, flags in zip(optimizer.param_groups, chosen):
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu",
                                                     torch.float32 if on_device else step.dtype)


def restore(ckpt, t, state, rank):
    """Load a training checkpoint into the training objects `t` and `state`. Returns warnings to log:
    what starts afresh because the checkpoint does not hold it."""
    t.raw.load_state_dict(ckpt["model"])
    load_optimizer(t.optimizer, ckpt["optimizer"])
    t.schedule.load_state_dict(ckpt["scheduler"])
    notes = []
    if ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    elif t.scaler.is_enabled():  # a disabled scaler (bf16, off, CPU) saves {}, which an enabled one refuses
        notes.append("the checkpoint holds no grad-scaler state (train.amp was not fp16); the fp16 grad scaler "
                     "starts fresh")
    if t.ema is not None and ckpt.get("ema"):
        t.ema.load_state_dict(ckpt["ema"])
    elif t.ema is not None:  # EMA switched on mid-run: start the average from the resumed weights
        t.ema.restart()
        notes.append("the checkpoint holds no EMA weights (train.ema was off); the EMA starts from its weights")
    state.epoch, state.step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
    state.sums = list(ckpt["epoch_sums"]) if rank == 0 else [0.0, 0.0, 0.0]
    state.partial_time = float(ckpt["partial_time"])
    state.history, state.best_val_acc = list(ckpt["history"]), float(ckpt["best_val_acc"])
    state.bad_epochs = int(ckpt["bad_epochs"])
    return notes


# ------------------------------------------------------------------------------- save policy

class Checkpointer:
    """The save policy of one run, in the spirit of timm's CheckpointSaver: a resumable checkpoint
    every `checkpoint.save_every` epochs (and at the last), the newest `keep_last` of them kept,
    `best.pth` when the score improves, the final weights at the end, and a step checkpoint when
    a signal stops the run. Every rank calls it (the RNG states are gathered from all ranks);
    only rank 0 writes."""

    def __init__(self, cfg, ctx, model_args, run):
        self.cfg, self.ctx, self.model_args, self.run = cfg, ctx, model_args, run
        self.dir = run.ckpt
        self.writer = ctx.rank == 0
        self.final_path = os.path.join(self.dir, final_weights_name(ctx.info.dataset, model_args["name"]))
        self.resumed_config = None  # the config of the checkpoint a resume continued from

    def _write(self, name, payload):
        """Atomic: a failed write (disk full, folder gone) leaves the last good file as it was."""
        path = os.path.join(self.dir, name)
        if self.writer:
            try:
                save_checkpoint(path, payload)
            except OSError as e:
                raise UserError(f"cannot write {path} ({e.strerror or e}); the last checkpoint written is intact: "
                                f"free space or fix the folder, then continue with checkpoint.resume=true",
                                code=1) from None
        return path

    def _common(self, t, state):
        return {"format": FORMAT, "model": strip_prefixes(t.raw.state_dict()), "model_args": self.model_args,
                "data_info": self.ctx.info.to_dict(), "config": to_plain(self.cfg), "run": self.run.name,
                "epoch": state.epoch, "history": list(state.history)}

    def training_payload(self, t, state, rng):
        return {**self._common(t, state), "ema": t.ema.state_dict() if t.ema is not None else None,
                "optimizer": t.optimizer.state_dict(), "scheduler": t.schedule.state_dict(),
                "scaler": t.scaler.state_dict(), "step_in_epoch": state.step, "epoch_sums": list(state.sums),
                "partial_time": state.partial_time, "best_val_acc": state.best_val_acc,
                "bad_epochs": state.bad_epochs, "rng": rng, "world_size": self.ctx.world}

    def weights_payload(self, t, state):
        """Self-describing weights (best, final); with train.ema the averaged weights go beside
        the raw ones, as `ema_model`."""
        ema = {"ema_model": strip_prefixes(t.ema.module.state_dict())} if t.ema is not None else {}
        return {**self._common(t, state), **ema}

    def end_of_epoch(self, t, state, improved, last):
        """After epoch `state.epoch`: the resumable checkpoint first (metrics.jsonl is rebuilt from
        it on resume), then the pruning, then best.pth."""
        if state.epoch % self.cfg.checkpoint.save_every == 0 or last:
            rng = gather_rng(self.ctx.device, self.ctx.world)
            self._write(epoch_ckpt_name(state.epoch), self.training_payload(t, state, rng))
            if self.writer:
                prune_checkpoints(self.dir, self.cfg.checkpoint.keep_last)
        if improved:
            self._write("best.pth", self.weights_payload(t, state))

    def interrupted(self, t, state):
        """A step checkpoint that records the position inside the epoch."""
        rng = gather_rng(self.ctx.device, self.ctx.world)
        return self._write(epoch_ckpt_name(state.epoch, state.step), self.training_payload(t, state, rng))

    def final(self, t, state):
        return self._write(os.path.basename(self.final_path), self.weights_payload(t, state))

    def resume(self, t, state):
        """Load the newest valid checkpoint into `t` and `state` when the config asks for it (rank
        0 picks the file; all ranks load it). Returns its path, or None for a fresh start."""
        if not self.run.resume:
            return None
        ctx = self.ctx
        found = find_resume_checkpoint(self.dir, self.cfg.checkpoint.resume_epoch, ctx.logger) if self.writer else None
        path = from_rank0(found[0] if found else None, ctx.world)
        if path is None:
            if self.run.required:
                raise UserError(f"checkpoint.resume=true but {self.dir} holds no readable checkpoint; "
                                f"train without checkpoint.resume=true, or set run.name to another run")
            return None
        ckpt = found[1] if found else load_checkpoint(path)
        check_same_run(path, ckpt, self.model_args, ctx.info.dataset)
        self.resumed_config = ckpt.get("config")
        try:
            notes = restore(ckpt, t, state, ctx.rank)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            raise UserError(f"checkpoint '{path}' cannot be resumed ({why}); it was edited or damaged: resume an "
                            f"earlier one (checkpoint.resume_epoch=N) or start a new run", code=1) from None
        for note in notes:
            ctx.logger.warning(note)
        self._restore_rng(ckpt, state)
        if ctx.world != int(ckpt.get("world_size", 1)):
            ctx.logger.info(f"checkpoint was written by {ckpt.get('world_size')} rank(s); continuing on {ctx.world}")
        warning = rebase_to_global_batch(ckpt, self.cfg.train, ctx.world, t.schedule, state)
        if warning:
            ctx.logger.warning(warning)
        return path

    def _restore_rng(self, ckpt, state):
        rng, ctx = ckpt.get("rng") or [], self.ctx
        if len(rng) == ctx.world:
            set_rng_state(rng[ctx.rank], ctx.device)
        else:
            seed_everything(self.cfg.train.seed + 1000 * state.epoch + ctx.rank)


# ---------------------------------------------------------------------- checkpoint metadata

INT_ARGS = {"image_size": 1024, "patch_size": 1024, "in_channels": 4, "num_classes": 100_000, "dim": 8192,
            "depth": 256, "heads": 256}  # key -> largest value a checkpoint may ask for
FLOAT_ARGS = {"mlp_ratio": (0.0, 64.0), "dropout": (0.0, 1.0), "drop_path": (0.0, 1.0)}  # open or half-open ranges
CHOICE_ARGS = {"name": MODEL_NAMES, "pool": ("cls", "mean"), "stem": ("patch", "conv")}
MAX_PARAMS = 1_000_000_000  # a checkpoint asking for more (4 GB of fp32) is refused before anything is allocated


def _bad(path, what):
    return UserError(f"checkpoint '{path}': {what}; the file was edited or damaged, use one written by train.py",
                     code=1)


def check_model_args(args, path):
    """model_args as a checkpoint holds them, checked like the config (types, known names, sane
    sizes) before anything is built; returns the parameter count."""
    if not isinstance(args, dict):
        raise _bad(path, "model_args is not a mapping")
    unknown = sorted(set(args) - set(INT_ARGS) - set(FLOAT_ARGS) - set(CHOICE_ARGS))
    if unknown:
        raise _bad(path, f"model_args has unknown keys {unknown}")
    for key, top in INT_ARGS.items():
        value = args.get(key)
        if type(value) is not int or not 1 <= value <= top:
            raise _bad(path, f"model_args.{key}={value!r} is not an integer in 1..{top}")
    for key, (lo, hi) in FLOAT_ARGS.items():
        value = args.get(key, lo)
        if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value < hi:
            raise _bad(path, f"model_args.{key}={value!r} is not a number in [{lo}, {hi})")
    for key, allowed in CHOICE_ARGS.items():
        if args.get(key, allowed[0]) not in allowed:
            raise _bad(path, f"model_args.{key}={args.get(key)!r} is not one of {', '.join(allowed)}")
    try:
        with torch.device("meta"):  # shapes only: no memory, however large the numbers
            n = sum(p.numel() for p in build_model(args).parameters())
    except (ValueError, TypeError, RuntimeError) as e:
        raise _bad(path, f"model_args do not build a model ({str(e).splitlines()[0][:120]})") from None
    if n > MAX_PARAMS:
        raise _bad(path, f"model_args ask for {n:,} parameters, more than the {MAX_PARAMS:,} allowed")
    return n


def check_data_info(info, model_args, path):
    """data_info against the model it goes with: the classes, one mean/std per input channel."""
    if not isinstance(info, dict):
        raise _bad(path, "data_info is not a mapping")
    classes, mean, std = info.get("classes"), info.get("mean"), info.get("std")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise _bad(path, "data_info.classes is not a list of names")
    if len(classes) != model_args["num_classes"]:
        raise _bad(path, f"data_info names {len(classes)} classes but the model has {model_args['num_classes']}")
    for key, values in (("mean", mean), ("std", std)):
        if not isinstance(values, list) or len(values) != model_args["in_channels"] or not all(
                type(v) in (int, float) and math.isfinite(v) and (key == "mean" or v > 0) for v in values):
            raise _bad(path, f"data_info.{key}={values!r} is not {model_args['in_channels']} finite number(s)"
                             + (" above 0" if key == "std" else ""))
    if not isinstance(info.get("dataset"), str) or type(info.get("digit_style")) is not bool:
        raise _bad(path, "data_info.dataset or data_info.digit_style is missing or of the wrong type")
    size = info.get("native_size")
    if type(size) is not int or not 1 <= size <= INT_ARGS["image_size"]:
        raise _bad(path, f"data_info.native_size={size!r} is not an integer in 1..{INT_ARGS['image_size']}")


# ------------------------------------------------------------------------- trained weights

def load_weights(model, weights, path):
    """load_state_dict with a one-line UserError when the weights belong to another model."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise UserError(f"checkpoint '{path}': the weights do not fit its model_args "
                        f"({lines[1].strip() if len(lines) > 1 else e}); "
                        f"the file was edited or mixed from two runs", code=1) from None


def weights_in(path):
    """The weights file a path names: a file or export as it is; for a run folder its final
    weights, else its best.pth, else its newest checkpoint."""
    if not os.path.isdir(path) or is_export(path):
        return path
    found = newest_final(path) or next((p for p in [os.path.join(path, "best.pth")] if os.path.isfile(p)), None)
    found = found or next(iter(list_checkpoints(path)), None)
    if found is None:
        raise UserError(f"{path} holds no weights (no *_final.pth, best.pth or epoch_*.pt); pass a weights file "
                        f"or a run folder under checkpoint.dir")
    return found


def load_trained(path):
    """(model on the CPU with its preferred weights, the checkpoint, "EMA" or "raw") from a file
    that train.py wrote, or from a safetensors export (its folder, model.json or .safetensors file);
    weights saved on a GPU load anywhere. A file that cannot rebuild its model is a one-line UserError."""
    if is_export(path):
        return load_export(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    if "model_args" not in ckpt or "data_info" not in ckpt:
        raise UserError(f"checkpoint '{path}' has no model_args/data_info, so the model cannot be rebuilt from it; "
                        f"use a *_final.pth or best.pth written by train.py", code=1)
    check_model_args(ckpt["model_args"], path)
    check_data_info(ckpt["data_info"], ckpt["model_args"], path)
    for key in ("model", "ema_model"):
        weights = ckpt.get(key, {})
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise _bad(path, f"'{key}' is not a mapping of names to tensors")
    model = build_model(ckpt["model_args"])
    weights, kind = preferred_weights(ckpt)
    load_weights(model, weights, path)
    return model, ckpt, kind


# ------------------------------------------------------------------------------------ exports

EXPORT_META = "model.json"  # what export.py writes beside the exported model
def is_export(path):
    """True for what export.py writes: its folder, its model.json or a .safetensors file."""
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, n)) for n in (EXPORT_META, "model.safetensors"))
    return path.endswith(".safetensors") or os.path.basename(path) == EXPORT_META


def read_export_meta(folder):
    """model.json of an export folder, checked for the keys that rebuild the model."""
    meta_path = os.path.join(folder, EXPORT_META)
    if not os.path.isfile(meta_path):
        raise UserError(f"export '{folder}' has no {EXPORT_META}; export again with python export.py "
                        f"--format safetensors --output {folder}", code=1)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} cannot be read ({type(e).__name__}: {str(e)[:100]}); export again", code=1) \
            from None
    keys = ("format", "file", "model_args", "dataset", "classes", "input", "preprocessing")
    missing = [k for k in keys if k not in meta] if isinstance(meta, dict) else list(keys)
    try:
        pre = meta["preprocessing"] if not missing else {}
        meta["data_info"] = {"dataset": meta["dataset"], "classes": list(meta["classes"]), "mean": pre["mean"],
                             "std": pre["std"], "in_channels": meta["input"]["channels"],
                             "digit_style": pre["digit_style"], "native_size": pre["native_size"]}
    except (KeyError, TypeError) as e:
        missing = missing or [str(e)]
    if missing:
        raise UserError(f"{meta_path} has no {', '.join(missing)}; it was not written by export.py, export again",
                        code=1)
    return meta


def load_export(path):
    """load_trained() for a safetensors export: (model, a checkpoint-like dict, "EMA" or "raw")."""
    folder = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
    if not os.path.exists(path):
        raise UserError(f"export file '{path}' not found; pass the export folder or its model.safetensors")
    meta = read_export_meta(folder)
    if meta["format"] != "safetensors":
        raise UserError(f"export '{folder}' holds {meta['format']}, which infer.py and --eval do not run; run it "
                        f"with its own runtime (docs/export.md) or export with --format safetensors", code=1)
    weights_path = path if path.endswith(".safetensors") else os.path.join(folder, meta["file"])
    if not os.path.isfile(weights_path):
        raise UserError(f"export '{folder}': {os.path.basename(weights_path)} is missing; export again", code=1)
    try:
        weights, _ = read_safetensors(weights_path)
    except (OSError, ValueError) as e:
        raise UserError(f"{weights_path} is not a readable safetensors file ({e}); export again", code=1) from None
    check_model_args(meta["model_args"], os.path.join(folder, EXPORT_META))
    check_data_info(meta["data_info"], meta["model_args"], os.path.join(folder, EXPORT_META))
    model = build_model(meta["model_args"])
    load_weights(model, weights, weights_path)
    ckpt = {"model_args": meta["model_args"], "data_info": meta["data_info"],
            "epoch": (meta.get("source") or {}).get("epoch"), "export": meta}
    return model, ckpt, meta.get("weights", "raw")


def init_weights(model, path):
    """Fill `model` from the weights at `path` (model.init_from: a weights file, a training
    checkpoint, an export or a run folder), adapting the head, the position embedding and the
    input channels. Returns one line that says what was loaded, reset and adapted."""
    if not os.path.exists(path):
        raise UserError(f"model.init_from={path}: no such file or folder; give a weights file, a checkpoint or a "
                        f"run folder (checkpoints/<run>)")
    source = weights_in(path)
    src_model, ckpt, kind = load_trained(source)
    try:
        state, notes = transfer_weights(src_model.state_dict(), model)
    except ValueError as e:
        raise UserError(f"model.init_from={path}: {e}; only the classifier head, the position embedding (image size) "
                        f"and the input channels are adapted, so keep model.dim, depth, heads, patch_size and stem "
                        f"as in that run") from None
    model.load_state_dict(state)
    parts = [f"loaded {notes['loaded']} of {len(state)} tensors"]
    for what in ("reset", "resized", "adapted"):
        if notes[what]:
            parts.append(f"{what} {', '.join(notes[what])}")
    info = ckpt["data_info"]
    return (f"model.init_from {source} ({kind} weights of a {info['dataset']} model with "
            f"{len(info['classes'])} classes): " + "; ".join(parts))
