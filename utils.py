"""Config loading and validation, logging, atomic files, device choice and the CLI error handler.

Everything a user can get wrong here raises UserError with one line that names the cause and
the fix; the entry points print it and exit non-zero without a traceback.
"""
import functools
import json
import logging
import logging.handlers
import math
import os
import random
import struct
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
    "data.hflip": ("auto", True, False),
    "data.channels": ("auto", 1, 3),
    "data.placement": ("auto", "device", "host"),
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
MAY_BE_EMPTY = {"run.name", "model.init_from"}  # "" means: choose for me / none
# key -> (lowest allowed, lowest is inclusive, highest allowed, highest is inclusive)
RANGES = {
    "data.num_workers": (0, True, 64, True), "data.train_limit": (0, True, None, None),
    "data.test_limit": (0, True, None, None), "data.translate": (0, True, 8, True),
    "data.crop_padding": (0, True, 32, True), "data.random_erasing": (0, True, 1, True),
    "data.mixup_alpha": (0, True, None, None), "data.cutmix_alpha": (0, True, None, None),
    "data.mix_off_epoch": (0, True, None, None), "data.rotate": (0, True, 180, True),
    "data.val_split": (0, True, 1, False), "log.progress_s": (0, True, None, None),
    "data.scale": (0, True, 0.5, True),
    "model.image_size": (1, True, 1024, True), "model.patch_size": (1, True, None, None),
    "model.dim": (1, True, None, None), "model.depth": (1, True, None, None), "model.heads": (1, True, None, None),
    "model.mlp_ratio": (0, False, None, None), "model.dropout": (0, True, 1, False),
    "model.drop_path": (0, True, 1, False),
    "train.epochs": (1, True, None, None), "train.min_steps": (0, True, None, None),
    "train.batch_size": (1, True, None, None),
    "train.lr": (0, False, None, None), "train.momentum": (0, True, 1, False),
    "train.weight_decay": (0, True, None, None), "train.warmup_epochs": (0, True, None, None),
    "train.min_lr_ratio": (0, True, 1, True), "train.step_epochs": (0, False, None, None),
    "train.gamma": (0, False, 1, True), "train.restart_epochs": (0, False, None, None),
    "train.restart_mult": (1, True, None, None), "train.label_smoothing": (0, True, 1, False),
    "train.grad_clip": (0, True, None, None), "train.grad_accum": (1, True, None, None),
    "train.seed": (0, True, 2**31 - 1, True), "train.threads": (0, True, 1024, True),
    "train.eval_batch_size": (1, True, None, None),
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
                raise UserError(f"config key '{path}' in {where} is a group; set one of its keys, "
                                f"e.g. {path}.<key>=...")
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
        if not math.isfinite(value):  # every comparison with NaN is false: no range check would catch it
            raise UserError(f"{key}={value!r} is not a finite number; give a plain number such as {default!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise UserError(f"{key}={value!r} has the wrong type; expected a string")
        if not value and key not in MAY_BE_EMPTY:
            raise UserError(f"{key} is empty; give it a value")
    if key in RANGES:
        lo, lo_inc, hi, hi_inc = RANGES[key]
        bad_lo = lo is not None and (value < lo if lo_inc else value <= lo)
        bad_hi = hi is not None and (value > hi if hi_inc else value >= hi)
        if bad_lo or bad_hi:
            lo_s = "" if lo is None else (f">= {lo}" if lo_inc else f"> {lo}")
            hi_s = "" if hi is None else (f"<= {hi}" if hi_inc else f"< {hi}")
            raise UserError(f"{key}={value!r} is out of range; it must be {' and '.join(s for s in (lo_s, hi_s) if s)}")


def _resolved(cfg, schema):
    """Every key's value with ${...} interpolations resolved; one that cannot be resolved is a
    UserError naming the key."""
    values = {}
    for key in schema:
        try:
            values[key] = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception as e:
            raise UserError(f"{key}: its value cannot be resolved ({str(e).splitlines()[0]}); write a plain value "
                            f"or a ${{...}} that names an existing key") from None
    return values


def validate_config(cfg, schema):
    """Types, ranges and the cross-key rules against `schema` (key -> default). Raises UserError
    naming the key."""
    values = _resolved(cfg, schema)
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
        raise UserError(f"cannot read the overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from None


def _load_yaml(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' not found; pass an existing YAML file (e.g. --config config.yaml)")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:
        raise UserError(f"{what} '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
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
    env = _resolved(OmegaConf.merge(merged, *layers_cli), ["environment"])["environment"]
    if env not in CHOICES["environment"]:
        raise UserError(f"environment={env!r} is not allowed; choose one of: {'|'.join(CHOICES['environment'])}")
    profile = OmegaConf.to_container(merged.profiles).get(env) or {}
    cfg = OmegaConf.merge(merged, profile, *layers_cli)
    for key, choices in CHOICES.items():  # YAML reads `off` as false: train.amp=off means the word
        if "off" in choices and OmegaConf.select(cfg, key) is False:
            OmegaConf.update(cfg, key, "off")
    validate_config(cfg, schema)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # resolved once: a value never changes later
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


_LOG_FORMAT = logging.Formatter("%(asctime)s rank%(rank)d %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def setup_logging(rank, level="INFO"):
    """Rank 0 logs to the console; other ranks print warnings only. Until log_to_file() names the
    run's file, rank 0's lines are also kept in memory, so the file gets the start-up lines too."""
    logger = logging.getLogger("vit_toolkit")
    for h in logger.handlers:
        h.close()
    logger.handlers.clear()
    logger.setLevel(getattr(logging, level))
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    console.setFormatter(_LOG_FORMAT)
    console.addFilter(_RankFilter(rank))
    logger.addHandler(console)
    if rank == 0:
        logger.addHandler(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    logger.rank = rank
    return logger


def log_to_file(logger, path):
    """Also append the log to `path` (rank 0's train.log of the run), starting with the lines kept so far."""
    handler = logging.FileHandler(path)
    handler.setFormatter(_LOG_FORMAT)
    handler.addFilter(_RankFilter(logger.rank))
    for kept in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        kept.setTarget(handler)
        kept.close()  # flushes into the file
        logger.removeHandler(kept)
    logger.addHandler(handler)


# ---------------------------------------------------------------------------------- atomic files

def ensure_writable(folder, key):
    """Create `folder` and prove that a file can be written in it, before any work depends on it.
    `key` names the setting that chose the folder, for the message."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{key}: {folder} is not a folder (a file is in the way); choose another path",
                        code=1) from None
    except OSError as e:
        raise UserError(f"{key}: cannot write in {folder} ({e.strerror or e}); choose a writable folder with "
                        f"free space", code=1) from None


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


# ------------------------------------------------------------------------------- safetensors

# The safetensors format is read and written here, in a few dozen lines, so that reading an
# export needs no extra package.
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


# ----------------------------------------------------------------------------------------- device

def resolve_device(choice, no_mps=False, local_rank=0):
    """train.device (auto|cuda|mps|cpu) -> a torch.device; a choice this machine lacks is a UserError."""
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


def configure_cuda(device, tf32=True):
    """CUDA's speed switches, for a run on `device`: TF32 for float32 matrix multiplies and cuDNN
    convolutions (a 10-bit mantissa inside, float32 in and out; what train.amp=off runs on a recent
    GPU), and cuDNN's autotuner, which times the conv algorithms once per input shape (the shapes of
    a run are fixed). Nothing changes on other devices."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    precision = "tf32" if tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; allow_tf32 warns there
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")


def print_error(error, rank=None):
    """The one-line form of a UserError, on stderr."""
    where = "error" if rank is None else f"error (rank {rank})"
    print(f"{where}: {error}", file=sys.stderr, flush=True)


def user_errors(main):
    """An entry point's main(argv): a UserError becomes one line on stderr and its exit code."""
    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print_error(e)
            return e.code
    return guarded


def exit_with(main):
    """sys.exit(main()), quietly when stdout is a pipe that closed early (`... | head`)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 1
    sys.exit(code)
