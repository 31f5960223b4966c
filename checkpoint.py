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
model.safetensors), so infer.py and `--eval` run an export like a checkpoint. The safetensors
format is read and written here, in a few dozen lines, so that reading an export needs no extra package.
"""
import io
import json
import math
import os
import random
import struct
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from launch import from_rank0
from model import build_model, preferred_weights, strip_prefixes
from utils import UserError, atomic_write_bytes, seed_everything, to_plain

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


def restore(ckpt, t, state, rank):
    """Load a training checkpoint into the training objects `t` and `state`."""
    t.raw.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.schedule.load_state_dict(ckpt["scheduler"])
    t.scaler.load_state_dict(ckpt["scaler"])
    restarted_ema = False
    if t.ema is not None and ckpt.get("ema"):
        t.ema.load_state_dict(ckpt["ema"])
    elif t.ema is not None:  # EMA switched on mid-run: start the average from the resumed weights
        t.ema.restart()
        restarted_ema = True
    state.epoch, state.step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
    state.sums = list(ckpt["epoch_sums"]) if rank == 0 else [0.0, 0.0, 0.0]
    state.partial_time = float(ckpt["partial_time"])
    state.history, state.best_val_acc = list(ckpt["history"]), float(ckpt["best_val_acc"])
    state.bad_epochs = int(ckpt["bad_epochs"])
    return restarted_ema


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
        if restore(ckpt, t, state, ctx.rank):
            ctx.logger.warning("the checkpoint holds no EMA weights (train.ema was off); the EMA starts from its "
                               "weights")
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
    model = build_model(ckpt["model_args"])
    weights, kind = preferred_weights(ckpt)
    load_weights(model, weights, path)
    return model, ckpt, kind


# ------------------------------------------------------------------------------------ exports

EXPORT_META = "model.json"  # what export.py writes beside the exported model
# torch dtype <-> the safetensors name; every dtype a state_dict of ours can hold
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}


def safetensors_bytes(tensors, metadata=None):
    """The safetensors encoding: an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and [begin, end) byte offsets (plus an optional `__metadata__` of strings),
    then the raw little-endian bytes of every tensor, back to back."""
    if sys.byteorder != "little":
        raise UserError("writing safetensors needs a little-endian machine; export on x86 or ARM", code=1)
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    chunks, offset = [], 0
    # widest dtypes first: every tensor then starts at a multiple of its own element size
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in ST_DTYPES:
            raise UserError(f"tensor {name} has dtype {t.dtype}, which safetensors export does not handle", code=1)
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format allows trailing spaces; 8-byte alignment keeps the data aligned
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def write_safetensors(path, tensors, metadata=None):
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def read_safetensors(path):
    """(name -> tensor, metadata) from a safetensors file. Raises ValueError naming what is wrong."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or struct.unpack("<Q", raw[:8])[0] > len(raw) - 8:
        raise ValueError("truncated: the header is longer than the file")
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError:
        raise ValueError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata, body = header.pop("__metadata__", None) or {}, raw[8 + n:]
    tensors, covered = {}, 0
    for name, e in sorted(header.items(), key=lambda item: tuple(_offsets(item))):  # empty tensors first
        begin, end = _offsets((name, e))
        dtype = ST_TORCH.get(e.get("dtype"))
        shape = e.get("shape")
        if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name}: unknown dtype {e.get('dtype')!r} or a bad shape {shape!r}")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if begin != covered or end - begin != size or end > len(body):
            raise ValueError(f"tensor {name}: bytes {begin}..{end} do not match its shape {shape} and dtype, "
                             f"overlap another tensor or run past the end of the file")
        chunk = bytearray(body[begin:end])  # a fresh buffer: aligned and writable
        flat = torch.frombuffer(chunk, dtype=dtype) if chunk else torch.zeros(0, dtype=dtype)  # frombuffer wants bytes
        tensors[name] = flat.reshape(shape)
        covered = end
    if covered != len(body):
        raise ValueError(f"{len(body) - covered} bytes after the last tensor; the file is corrupt")
    return tensors, metadata


def _offsets(item):
    name, e = item
    offsets = e.get("data_offsets") if isinstance(e, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"tensor {name}: no [begin, end] data_offsets")
    return offsets


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
    try:
        model = build_model(meta["model_args"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{folder}/{EXPORT_META}: its model_args do not build a model ({e}); export again",
                        code=1) from None
    load_weights(model, weights, weights_path)
    ckpt = {"model_args": meta["model_args"], "data_info": meta["data_info"],
            "epoch": (meta.get("source") or {}).get("epoch"), "export": meta}
    return model, ckpt, meta.get("weights", "raw")
