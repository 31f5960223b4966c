"""Datasets as device-resident uint8 tensors, and whole-batch normalisation and augmentation.

Files on disk are parsed directly (IDX for the MNIST-style sets, pickle batches for CIFAR-10,
an ImageFolder tree for `folder`), so re-packed archives with other checksums work offline.
torchvision's dataset classes are used only to download what is missing.
"""
import gzip
import math
import os
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from utils import UserError

DIGITS = [str(i) for i in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# name -> (folder under data_root, class names, mean, std, channels, digit-style)
DATASETS = {
    "mnist": ("MNIST", DIGITS, (0.1307,), (0.3081,), 1, True),
    "fashion_mnist": ("FashionMNIST", FASHION, (0.2860,), (0.3530,), 1, True),
    "cifar10": ("cifar-10-batches-py", CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 3, False),
}
IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


class DataError(UserError):
    def __init__(self, message):
        super().__init__(message, code=1)


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8, on the training device (or in pinned host memory: see placement)
    labels: torch.Tensor  # (N,) int64, beside the images

    def __len__(self):
        return self.labels.shape[0]


@dataclass
class DataInfo:
    """What infer.py and --eval need to know about the data; stored in every checkpoint."""
    dataset: str
    classes: list
    mean: tuple
    std: tuple
    in_channels: int
    digit_style: bool
    native_size: int
    hflip: bool = False   # random horizontal flips in training (data.hflip, resolved for this data set)
    extra: dict = field(default_factory=dict)

    def to_dict(self):
        return {"dataset": self.dataset, "classes": list(self.classes), "mean": list(self.mean),
                "std": list(self.std), "in_channels": self.in_channels, "digit_style": self.digit_style,
                "native_size": self.native_size}


# --------------------------------------------------------------------------------------- IDX files

def _read_maybe_gz(path):
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: the gzip stream is corrupt or truncated ({e}); replace the file") from None
    return raw


def read_idx(path, expect_dims):
    """Parse an IDX file (gzipped or not): magic 0x0000 08 0D, then big-endian sizes, then bytes."""
    raw = _read_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number); replace the file")
    dims = raw[3]
    if dims != expect_dims:
        raise DataError(f"{path}: has {dims} dimensions, expected {expect_dims} "
                        f"({'images' if expect_dims == 3 else 'labels'} file); check the file names")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path}: truncated header; replace the file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    need = math.prod(shape)  # Python integers: a crafted header cannot overflow past the check
    if len(raw) - header != need:
        raise DataError(f"{path}: holds {len(raw) - header} data bytes but its header says {need} "
                        f"(shape {shape}); the file is truncated or corrupt")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy())


def _find(folder, base):
    for name in (base, base + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def load_idx_split(raw_dir, train):
    """(images (N,1,28,28) uint8, labels (N,) int64) from the two IDX files of one split."""
    img_path, lbl_path = (_find(raw_dir, b) for b in IDX_FILES[train])
    images = read_idx(img_path, 3)
    labels = read_idx(lbl_path, 1).long()
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} "
                        f"labels; the two files must come from the same split")
    if labels.numel() and int(labels.max()) > 9:
        raise DataError(f"{lbl_path}: label {int(labels.max())} is outside 0..9; replace the file")
    return images.unsqueeze(1), labels


def _idx_missing(raw_dir):
    return [b for t in (True, False) for b in IDX_FILES[t] if _find(raw_dir, b) is None]


# -------------------------------------------------------------------------------------- CIFAR-10

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only the numpy pieces they need, so a file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}); replace the file") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a dict); replace the file")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    return d


def load_cifar_split(folder, train):
    images, labels = [], []
    for name in (CIFAR_FILES[:5] if train else ["test_batch"]):
        path = os.path.join(folder, name)
        d = _read_cifar_batch(path)
        if "data" not in d or "labels" not in d:
            raise DataError(f"{path}: has no 'data'/'labels' entries; replace the file")
        try:
            data = np.asarray(d["data"])
            lab = np.asarray(d["labels"])
            if data.dtype != np.uint8 or lab.dtype.kind not in "iu" or lab.ndim != 1:
                raise ValueError(f"data of type {data.dtype} and labels of type {lab.dtype}, shape {lab.shape}")
            lab = lab.astype(np.int64)
        except (ValueError, TypeError, OverflowError) as e:
            raise DataError(f"{path}: expected uint8 image data and integer labels ({str(e)[:100]}); "
                            f"the file is corrupt, replace it") from None
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072); the file is corrupt")
        if data.shape[0] != lab.shape[0]:
            raise DataError(f"{path}: {data.shape[0]} images but {lab.shape[0]} labels; the file is corrupt")
        if lab.size and (lab.min() < 0 or lab.max() > 9):
            raise DataError(f"{path}: labels outside 0..9; the file is corrupt")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(lab))
    return torch.cat(images), torch.cat(labels)


def _extract_cifar_tar(data_root):
    """Unpack the CIFAR batches of cifar-10-python.tar.gz when only the archive is there: regular
    files with the expected names only, written as new files of this user with ordinary
    permissions (tarfile's "data" filter where Python has it): no links, no setuid or
    world-writable bits, no owner from the archive, nothing outside the target folder."""
    archive = os.path.join(data_root, "cifar-10-python.tar.gz")
    if not os.path.isfile(archive):
        return
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else None
    try:
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                if not m.isfile() or os.path.basename(m.name) not in CIFAR_FILES:
                    continue
                m.name = os.path.join("cifar-10-batches-py", os.path.basename(m.name))
                if safe:
                    tar.extract(m, data_root, **safe)
                    continue
                target = os.path.join(data_root, m.name)  # no filter: copy the bytes into a new file
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    dst.write(src.read())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot unpack ({e}); replace the archive") from None


# ---------------------------------------------------------------------------------- folder dataset

def eight_bit(im):
    """A PIL image with 8 bits per channel: 16-bit and 32-bit integer images are scaled down by their
    bit depth (not clipped: a 16-bit scan would turn white), float images from their 0..1 or 0..255
    range; other modes are returned as they are."""
    from PIL import Image
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
    else:
        top = 65535.0 if im.mode.startswith("I;16") or not a.size or a.max() <= 65535 else 4294967295.0
    return Image.fromarray(np.clip(np.nan_to_num(a) * (255.0 / top), 0, 255).round().astype(np.uint8), "L")


def image_uint8(im, size, channels=3):
    """A PIL image as uint8 (channels, size, size), resized bilinearly: how folder data sets are
    stored, and how infer.py prepares an image for a model of such a set."""
    from PIL import Image
    im = eight_bit(im).convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _decode(path, size):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return image_uint8(im, size, 3)
    except Exception as e:
        raise DataError(f"{path}: not a readable image ({e}); remove or replace it") from None


def load_folder_split(root, split, size, num_workers, classes=None):
    """(uint8 (N, 3, S, S), labels (N,), classes) of <root>/<split>/<class>/<image>."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"data.dataset=folder needs {folder}/<class>/<image> files; create the folder "
                        f"or set data.data_root to the folder that holds train/ and test/")
    found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    classes = classes or found
    if not classes:
        raise DataError(f"{folder} has no class sub-folders; put images in {folder}/<class>/")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{folder} has classes {unknown} that are not in train/; use the same class folders")
    items = [(os.path.join(folder, c, f), i) for i, c in enumerate(classes) if os.path.isdir(os.path.join(folder, c))
             for f in sorted(os.listdir(os.path.join(folder, c))) if f.lower().endswith(IMAGE_EXTS)]
    if not items:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)}); add some")
    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(lambda it: _decode(it[0], size), items))
    return torch.from_numpy(np.stack(arrays)), torch.tensor([i for _, i in items]), classes


def is_gray(x):
    """True when every image of a uint8 (N, 3, S, S) tensor has equal R, G and B."""
    return bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())


def to_channels(x, channels):
    """uint8 (N, 3, S, S) -> (N, channels, S, S); colour to grey with the ITU-R 601 weights (as PIL)."""
    if channels == 3:
        return x
    if is_gray(x):
        return x[:, :1].contiguous()
    w = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
    return ((x.int() * w).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)


def load_folder(root, size, num_workers=0, channels="auto"):
    """An image folder: train/ and test/, and val/ when present. Returns ([(x, y) of train, val or
    None, test], DataInfo). With channels=auto a set whose images are all grey loads as 1 channel."""
    tx, ty, classes = load_folder_split(root, "train", size, num_workers)
    has_val = os.path.isdir(os.path.join(root, "val"))
    val = load_folder_split(root, "val", size, num_workers, classes)[:2] if has_val else None
    vx, vy, _ = load_folder_split(root, "test", size, num_workers, classes)
    c = (1 if is_gray(tx) else 3) if channels == "auto" else int(channels)
    parts = [None if p is None else (to_channels(p[0], c), p[1]) for p in ((tx, ty), val, (vx, vy))]
    x = parts[0][0].float()
    mean = tuple((x.mean(dim=(0, 2, 3)) / 255).tolist())
    std = tuple((x.std(dim=(0, 2, 3)) / 255).clamp_min(1e-3).tolist())
    return parts, DataInfo("folder", classes, mean, std, c, False, size)


# -------------------------------------------------------------------------------------- loading

def _try_download(dataset, data_root, logger):
    """torchvision's download; returns '' on success, else the reason in a few words."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[dataset]
    try:
        for train in (True, False):
            cls(data_root, train=train, download=True)
    except Exception as e:
        return f"download failed: {str(e).strip().splitlines()[-1][:100]}"
    if logger:
        logger.info(f"{dataset}: downloaded to {data_root}")
    return ""


def load_raw(dataset, data_root, download=True, image_size=28, num_workers=0, logger=None):
    """Both splits of a dataset as CPU uint8 tensors: (train_x, train_y, test_x, test_y, info)."""
    if dataset == "folder":
        ((tx, ty), _, (vx, vy)), info = load_folder(data_root, image_size, num_workers)
        return tx, ty, vx, vy, info
    folder, classes, mean, std, channels, digit_style = DATASETS[dataset]
    if dataset == "cifar10":
        where = os.path.join(data_root, folder)
        missing = lambda: [f for f in CIFAR_FILES if not os.path.isfile(os.path.join(where, f))]  # noqa: E731
        if missing():
            _extract_cifar_tar(data_root)
        why = _try_download(dataset, data_root, logger) if missing() and download else "data.download=false"
        if missing():
            raise DataError(f"cifar10: missing {', '.join(missing())} in {where}/ ({why}); "
                            f"copy the CIFAR-10 python batches there, or cifar-10-python.tar.gz into {data_root}/")
        tx, ty = load_cifar_split(where, True)
        vx, vy = load_cifar_split(where, False)
        return tx, ty, vx, vy, DataInfo(dataset, classes, mean, std, channels, digit_style, 32)
    where = os.path.join(data_root, folder, "raw")
    why = _try_download(dataset, data_root, logger) if _idx_missing(where) and download else "data.download=false"
    if _idx_missing(where):
        raise DataError(f"{dataset}: missing {', '.join(_idx_missing(where))} (each may be .gz) in {where}/ "
                        f"({why}); copy the four IDX files there")
    tx, ty = load_idx_split(where, True)
    vx, vy = load_idx_split(where, False)
    for path_base, x in ((IDX_FILES[True][0], tx), (IDX_FILES[False][0], vx)):
        if tuple(x.shape[2:]) != (28, 28):
            raise DataError(f"{os.path.join(where, path_base)}: images are {tuple(x.shape[2:])}, expected (28, 28)")
    return tx, ty, vx, vy, DataInfo(dataset, classes, mean, std, channels, digit_style, 28)


@dataclass
class Splits:
    """The splits of a run: `val` is held out of the training set (data.val_split), or is the
    test split itself when nothing is held out."""
    train: Split
    val: Split
    test: Split
    info: DataInfo

    @property
    def held_out(self):
        return self.val is not self.test


def hold_out(labels, fraction, seed):
    """(train indices, val indices) of a stratified split: round(N * fraction) images, each class
    giving its share (largest remainder), drawn with a generator fixed by `seed`."""
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * fraction
    take = quota.floor().long()
    order = (quota - take).argsort(descending=True, stable=True)
    take[order[:round(len(labels) * fraction) - int(take.sum())]] += 1
    g = torch.Generator().manual_seed(seed * 7919 + 104729)
    members = [(labels == c).nonzero().squeeze(1) for c in classes.tolist()]
    val = torch.cat([idx[torch.randperm(len(idx), generator=g)[:k]] for idx, k in zip(members, take.tolist())])
    val = val.sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().squeeze(1), val


def flip_choice(hflip, info, logger=None):
    """data.hflip resolved: auto flips the natural-image sets (cifar10, fashion_mnist) and colour
    image folders, never digits, and not a grey folder (digits, letters and other handed shapes
    lose several points to flips)."""
    if hflip != "auto":
        return bool(hflip)
    flip = info.dataset in ("cifar10", "fashion_mnist") or (info.dataset == "folder" and info.in_channels == 3)
    if info.dataset == "folder" and logger:
        logger.info(f"data.hflip=auto: {'random horizontal flips' if flip else 'no flips'} for this "
                    f"{'colour' if flip else 'grey'} image folder; set data.hflip={str(not flip).lower()} "
                    f"if its classes {'have a handedness (digits, letters)' if flip else 'are photos of objects'}")
    return flip


def free_bytes(device):
    """Memory a data set may take on `device`: what CUDA reports free, MPS's recommended maximum; None
    for the CPU (there the data set is in host memory either way)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    return None


def placement(dcfg, image_size, device, logger=None):
    """Where a folder data set lives, decided and logged before any image is decoded: on the device,
    or, when its uint8 tensors would take more than half of the device's free memory (or
    data.placement=host), in pinned host memory with each batch copied over. Data order and
    augmentation are the same either way."""
    n = sum(len(files) for _, _, files in os.walk(dcfg.data_root))
    need = n * 3 * image_size * image_size  # at most 3 channels of uint8
    free = free_bytes(device)
    host = dcfg.placement == "host" or (dcfg.placement == "auto" and free is not None and need > free // 2)
    if logger:
        where = "pinned host memory, each batch copied to the device" if host else str(device)
        room = f" ({free / 2**20:,.0f} MB free there)" if free is not None else ""
        logger.info(f"folder data set: {n} files, at most {need / 2**20:,.0f} MB as uint8 at {image_size}x"
                    f"{image_size}: kept in {where}{room}")
    return host and device.type != "cpu"


def load_data(dcfg, image_size, device, seed=0, logger=None):
    """The train / val / test Splits and the DataInfo: limited to the first N images, a validation
    part (a folder set's val/, or a stratified data.val_split of the training set), moved to `device`
    (a folder set too large for it stays in pinned host memory)."""
    val, host = None, False
    if dcfg.dataset == "folder":
        host = placement(dcfg, image_size, device, logger)
        ((tx, ty), val, (vx, vy)), info = load_folder(dcfg.data_root, image_size, dcfg.num_workers, dcfg.channels)
    else:
        tx, ty, vx, vy, info = load_raw(dcfg.dataset, dcfg.data_root, dcfg.download, image_size, dcfg.num_workers,
                                        logger)
    info.hflip = flip_choice(dcfg.hflip, info, logger)
    if dcfg.train_limit:
        tx, ty = tx[:dcfg.train_limit], ty[:dcfg.train_limit]
    if dcfg.test_limit:
        vx, vy = vx[:dcfg.test_limit], vy[:dcfg.test_limit]
    # non-blocking only on CUDA: on MPS a non-blocking copy from host memory freed right after it can
    # corrupt the data (pytorch/pytorch#139550), and these CPU tensors go as soon as this returns
    def to(t):
        if host:
            return t.contiguous().pin_memory()
        return t.to(device, non_blocking=device.type == "cuda").contiguous()
    test = Split(to(vx), to(vy))
    if val is not None:
        if logger:
            logger.info(f"validating on {os.path.join(dcfg.data_root, 'val')} ({len(val[1])} images)")
        return Splits(Split(to(tx), to(ty)), Split(to(val[0]), to(val[1])), test, info)
    if not dcfg.val_split:
        return Splits(Split(to(tx), to(ty)), test, test, info)
    keep, held = hold_out(ty, dcfg.val_split, seed)
    if not len(held) or not len(keep):
        raise DataError(f"data.val_split={dcfg.val_split} of {len(ty)} training images holds out {len(held)}; "
                        f"choose a fraction that leaves images on both sides")
    return Splits(Split(to(tx[keep]), to(ty[keep])), Split(to(tx[held]), to(ty[held])), test, info)


# --------------------------------------------------------------------------------- batch transforms

def to_device(t, device):
    """A small host tensor (a step's random draws) on `device` without making the host wait for the
    work queued there: a blocking copy would wait for the device to drain its queue every step. CUDA
    copies from pinned memory behind the queued work; MPS copies block, since a non-blocking copy from
    memory freed right after it can corrupt the data (pytorch/pytorch#139550); the CPU keeps the tensor."""
    if device.type == "cpu" or (t.device.type == device.type and device.type != "cuda") or t.device == device:
        return t
    if device.type == "mps":
        return t.to(device)
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


_STATS = {}  # (mean, std, device, dtype) -> the (1, C, 1, 1) tensors, made once: no copy to the device per batch


def normalize(x, mean, std, image_size):
    """uint8 (B, C, H, W) -> float (B, C, S, S): scale, resize on the device if needed, standardise."""
    x = x.float().div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False)
    key = (tuple(mean), tuple(std), x.device, x.dtype)
    if key not in _STATS:
        _STATS[key] = tuple(torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) for v in (mean, std))
    m, s = _STATS[key]
    return x.sub_(m).div_(s)


def epoch_permutation(n, seed, epoch, device):
    """The training order of one epoch, from (seed, epoch): the same on every rank and world size."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).to(device)


def shard_bounds(n, rank, world_size):
    """Contiguous, disjoint shards that cover all n items exactly once (sizes differ by <= 1)."""
    return n * rank // world_size, n * (rank + 1) // world_size
