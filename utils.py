"""Config loading and validation, logging, atomic files and checkpoints.

Everything a user can get wrong here raises UserError with one line that names the cause and
the fix; the entry points print it and exit non-zero without a traceback.
"""
import io
import json
import logging
import os
import random
import sys
import time

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")


class UserError(Exception):
    """A failure the user caused and can fix: printed as one line, exit code `code`."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------- config

CHOICES = {
    "environment": ("local", "k8s"),
    "data.dataset": ("mnist", "fashion_mnist", "cifar10", "folder"),
    "model.name": ("vit", "torchvision_vit", "resnet"),
    "model.pool": ("cls", "mean"),
    "model.stem": ("patch", "conv"),
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.scheduler": ("cosine", "cosine_restarts", "step", "none"),
    "train.amp": ("auto", "off", "bf16", "fp16"),
    "train.device": ("auto", "cuda", "mps", "cpu"),
    "checkpoint.resume": (True, False, "auto"),
    "log.level": ("DEBUG", "INFO", "WARNING"),
    "distributed.backend": ("auto", "nccl", "gloo"),
}
# key -> (lowest allowed, lowest is inclusive, highest allowed, highest is inclusive)
RANGES = {
    "data.num_workers": (0, True, 64, True), "data.train_limit": (0, True, None, None),
    "data.test_limit": (0, True, None, None), "data.translate": (0, True, 8, True),
    "data.crop_padding": (0, True, 32, True), "data.random_erasing": (0, True, 1, True),
    "data.mixup_alpha": (0, True, None, None), "data.cutmix_alpha": (0, True, None, None),
    "data.mix_off_epoch": (0, True, None, None), "data.rotate": (0, True, 180, True), "data.scale": (0, True, 0.5, True),
    "model.image_size": (1, True, 1024, True), "model.patch_size": (1, True, None, None),
    "model.dim": (1, True, None, None), "model.depth": (1, True, None, None), "model.heads": (1, True, None, None),
    "model.mlp_ratio": (0, False, None, None), "model.dropout": (0, True, 1, False),
    "model.drop_path": (0, True, 1, False),
    "train.epochs": (1, True, None, None), "train.batch_size": (1, True, None, None),
    "train.lr": (0, False, None, None), "train.momentum": (0, True, 1, False),
    "train.weight_decay": (0, True, None, None), "train.warmup_epochs": (0, True, None, None),
    "train.min_lr_ratio": (0, True, 1, True), "train.step_epochs": (0, False, None, None),
    "train.gamma": (0, False, 1, True), "train.restart_epochs": (0, False, None, None),
    "train.restart_mult": (1, True, None, None), "train.label_smoothing": (0, True, 1, False),
    "train.grad_clip": (0, True, None, None), "train.grad_accum": (1, True, None, None),
    "train.seed": (0, True, 2**31 - 1, True), "train.eval_batch_size": (1, True, None, None),
    "train.early_stop_patience": (0, True, None, None), "train.early_stop_min_delta": (0, True, 1, True),
    "train.log_interval": (1, True, None, None), "train.ema_decay": (0, False, 1, False),
    "checkpoint.save_every": (1, True, None, None), "checkpoint.keep_last": (1, True, None, None),
    "checkpoint.resume_epoch": (-1, True, None, None),
    "distributed.timeout_s": (1, True, None, None), "distributed.master_port": (0, True, 65535, True),
}


def _leaves(node, prefix=""):
    """Yield (dotted key, value) for every leaf of a nested dict. `profiles` holds overlays of
    these keys, not keys of its own: _check_known reads it."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path == "profiles":
            continue
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _schema(defaults):
    """Every known key with its default, from the parsed config.yaml."""
    return dict(_leaves(defaults))


def _check_known(node, schema, where, prefix=""):
    """Every key must exist in config.yaml (a typo is an error, not a silently ignored key)."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path == "profiles":
            if not isinstance(value, dict):
                raise UserError(f"{where}: 'profiles' must be a mapping of environment name to overrides")
            for name, prof in value.items():
                if prof:
                    _check_known(prof, schema, f"{where} (profiles.{name})")
            continue
        is_group = any(k.startswith(path + ".") for k in schema)
        if path not in schema and not is_group:
            typed = path
            while isinstance(value, dict) and value:  # show the whole key as typed: trian.epochs
                key, value = next(iter(value.items()))
                typed = f"{typed}.{key}"
            raise UserError(f"unknown config key '{typed}' in {where}; known keys: {_near(path, schema)}")
        if is_group:
            if not isinstance(value, dict):
                raise UserError(f"config key '{path}' in {where} is a group; set one of its keys, e.g. {path}.<key>=...")
            _check_known(value, schema, where, path + ".")
        elif isinstance(value, dict):
            raise UserError(f"config key '{path}' in {where} takes a value, not a group")


def _near(path, schema):
    """The known keys in the misspelt key's group (or the groups), so the message shows the fix."""
    group = path.rsplit(".", 1)[0] + "." if "." in path else None
    same = [k for k in schema if group and k.startswith(group)]
    return ", ".join(same or sorted({k.split(".")[0] for k in schema}))


def _check_value(key, value, default):
    choices = CHOICES.get(key)
    if choices is not None:
        if not any(value == c and type(value) is type(c) for c in choices):
            shown = "|".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
            raise UserError(f"{key}={value!r} is not allowed; choose one of: {shown}")
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{key}={value!r} has the wrong type; expected true or false")
        return
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}={value!r} has the wrong type; expected an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}={value!r} has the wrong type; expected a number")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise UserError(f"{key}={value!r} has the wrong type; expected a string")
        if not value:
            raise UserError(f"{key} is empty; give it a value")
    if key in RANGES:
        lo, lo_inc, hi, hi_inc = RANGES[key]
        bad_lo = lo is not None and (value < lo if lo_inc else value <= lo)
        bad_hi = hi is not None and (value > hi if hi_inc else value >= hi)
        if bad_lo or bad_hi:
            lo_s = "" if lo is None else (f">= {lo}" if lo_inc else f"> {lo}")
            hi_s = "" if hi is None else (f"<= {hi}" if hi_inc else f"< {hi}")
            raise UserError(f"{key}={value!r} is out of range; it must be {' and '.join(s for s in (lo_s, hi_s) if s)}")


def validate_config(cfg, schema):
    """Types, ranges and the cross-key rules against `schema` (key -> default). Raises UserError
    naming the key."""
    values = dict(_leaves(OmegaConf.to_container(cfg, resolve=True)))
    for key, default in schema.items():
        _check_value(key, values.get(key), default)
    m = cfg.model
    if m.stem != "patch" and m.name != "vit":
        raise UserError(f"model.stem={m.stem} needs model.name=vit ({m.name} has its own stem); "
                        f"set model.stem=patch or model.name=vit")
    if m.name == "resnet":  # patch_size and heads are ViT keys
        return
    if m.image_size % m.patch_size:
        ok = [p for p in range(2, m.image_size + 1) if m.image_size % p == 0][:8]
        raise UserError(f"model.patch_size={m.patch_size} does not divide model.image_size={m.image_size}; "
                        f"use one of {ok}")
    if m.dim % m.heads:
        raise UserError(f"model.dim={m.dim} is not divisible by model.heads={m.heads}; "
                        f"e.g. model.dim={max(m.heads, m.dim // m.heads * m.heads)}")


def _parse_overrides(overrides):
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"cannot read override '{item}'; write it as key.sub=value, e.g. train.epochs=3")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # omegaconf's grammar errors
        raise UserError(f"cannot read the overrides {' '.join(overrides)}: {str(e).splitlines()[0]}")


def _load_yaml(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' not found; pass an existing YAML file (e.g. --config config.yaml)")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:
        raise UserError(f"{what} '{path}' is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{what} '{path}' must hold a mapping of config keys")
    return OmegaConf.to_container(loaded)


def load_config(config_file=None, overrides=(), extra=None):
    """config.yaml < --config FILE < the environment's profile < overrides (< `extra`, from flags).

    Returns a validated, read-only DictConfig. Raises UserError on any problem."""
    base = _load_yaml(DEFAULT_CONFIG, "default config")
    schema = _schema(base)
    layers = [base]
    if config_file and os.path.abspath(config_file) != DEFAULT_CONFIG:
        preset = _load_yaml(config_file, "config file")
        _check_known(preset, schema, config_file)
        layers.append(preset)
    cli = _parse_overrides(overrides)
    _check_known(cli, schema, "the command line")
    layers_cli = [cli] + ([extra] if extra else [])
    merged = OmegaConf.merge(*layers)
    env = OmegaConf.merge(merged, *layers_cli).get("environment")
    if env not in CHOICES["environment"]:
        raise UserError(f"environment={env!r} is not allowed; choose one of: {'|'.join(CHOICES['environment'])}")
    profile = OmegaConf.to_container(merged.profiles).get(env) or {}
    cfg = OmegaConf.merge(merged, profile, *layers_cli)
    for key, choices in CHOICES.items():  # YAML reads `off` as false: train.amp=off means the word
        if "off" in choices and OmegaConf.select(cfg, key) is False:
            OmegaConf.update(cfg, key, "off")
    validate_config(cfg, schema)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


# ---------------------------------------------------------------------------------------- logging

class _RankFilter(logging.Filter):
    def __init__(self, rank):
        super().__init__()
        self.rank = rank

    def filter(self, record):
        record.rank = self.rank
        return True


def setup_logging(log_dir, rank, level="INFO"):
    """Rank 0 logs to the console and <log_dir>/train.log; other ranks print warnings only."""
    logger = logging.getLogger("vit_toolkit")
    logger.handlers.clear()
    logger.setLevel(getattr(logging, level))
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s rank%(rank)d %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    handlers = [console]
    if rank == 0 and log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(log_dir, "train.log")))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_RankFilter(rank))
        logger.addHandler(h)
    return logger


# ---------------------------------------------------------------------------------- atomic files

def atomic_write_bytes(path, data):
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a reader
    sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def append_line(path, line):
    """One write() per line, flushed and synced, so a crash leaves whole lines."""
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_metrics(path, history):
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in history).encode())


# ------------------------------------------------------------------------------------ checkpoints

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
                        f"it is truncated or not a checkpoint of this toolkit", code=1)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"checkpoint '{path}' has no 'model' entry; it was not written by this toolkit", code=1)
    return ckpt


def epoch_ckpt_name(epoch, step=0):
    """epoch_003.pt after epoch 3; epoch_003_step000120.pt: 120 steps into epoch 4, after epoch 3."""
    return f"epoch_{epoch:03d}.pt" if step == 0 else f"epoch_{epoch:03d}_step{step:06d}.pt"


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


def newest_final(ckpt_dir):
    """The newest `*_final.pth` in ckpt_dir, or None."""
    if not os.path.isdir(ckpt_dir):
        return None
    finals = [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n.endswith("_final.pth")]
    return max(finals, key=lambda p: os.stat(p).st_mtime_ns) if finals else None


# --------------------------------------------------------------------------------------- RNG state

def get_rng_state(device):
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")


def exit_with(main):
    """sys.exit(main()), quietly when stdout is a pipe that closed early (`... | head`)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 1
    sys.exit(code)
