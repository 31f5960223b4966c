"""data.py: the parsers of every on-disk format (IDX, CIFAR batches and archive, image folders) on
small files written here, their one-line errors, and the whole-batch augmentations."""
import gzip
import hashlib
import json
import os
import pickle
import shutil
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import data
import infer
import train
from checkpoint import load_checkpoint
from conftest import ROOT, RUN, idx_bytes, read_metrics, small_run_args, write_cifar_set, write_idx_set
from augment import TRIVIAL_OPS, augment, batch_generator, mix_batch, random_erasing, trivial_augment
from data import DataError, epoch_permutation, load_raw, normalize, read_idx, shard_bounds

HAVE_MNIST = os.path.isfile(os.path.join(ROOT, "data", "MNIST", "raw", "t10k-images-idx3-ubyte.gz"))


def style(digits, flip=None):
    """The data set's side of augment(): digit-style or not, and whether to flip (default: not digits)."""
    return SimpleNamespace(digit_style=digits, hflip=(not digits) if flip is None else flip)


def aug_cfg(**kw):
    base = {"augment": True, "translate": 2, "crop_padding": 4, "hflip": True, "rotate": 0, "scale": 0.0,
            "trivial_augment": False, "random_erasing": 0.0}
    base.update(kw)
    return OmegaConf.create(base)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_set_loads_gzipped_or_not(tmp_path, gz):
    tx, ty, vx, vy = write_idx_set(str(tmp_path / "MNIST" / "raw"), gz=gz)
    a, b, c, d, info = load_raw("mnist", str(tmp_path), download=False)
    assert a.shape == (640, 1, 28, 28) and a.dtype == torch.uint8 and c.shape == (200, 1, 28, 28)
    assert torch.equal(a[:, 0], torch.from_numpy(tx)) and torch.equal(b, torch.from_numpy(ty).long())
    assert info.classes[3] == "3" and info.digit_style


def test_regzipped_fashion_files_load_without_md5(tmp_path):
    """Re-packed archives have other checksums than upstream; they are checked by parsing."""
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx_set(str(raw), gz=False)
    for name in os.listdir(raw):
        data = (raw / name).read_bytes()
        (raw / (name + ".gz")).write_bytes(gzip.compress(data, compresslevel=1, mtime=12345))
        (raw / name).unlink()
    a, b, _, _, info = load_raw("fashion_mnist", str(tmp_path), download=False)
    assert len(a) == 640 and info.classes[0] == "T-shirt/top"


def test_truncated_idx_names_the_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx_set(str(raw), gz=False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_raw("mnist", str(tmp_path), download=False)


def test_count_mismatch_and_bad_magic(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx_set(str(raw), gz=False)
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(639, np.uint8)))
    with pytest.raises(DataError, match="640 images but .* 639 labels"):
        load_raw("mnist", str(tmp_path), download=False)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(str(raw / "train-labels-idx1-ubyte"), 1)


def test_missing_files_are_listed_with_the_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_raw("mnist", str(tmp_path), download=False)
    msg = str(e.value)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert name in msg
    assert os.path.join(str(tmp_path), "MNIST", "raw") in msg


def test_cifar_batches_load_and_truncation_is_reported(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_set(str(folder))
    a, b, c, d, info = load_raw("cifar10", str(tmp_path), download=False)
    assert a.shape == (320, 3, 32, 32) and c.shape == (100, 3, 32, 32) and info.in_channels == 3
    p = folder / "data_batch_3"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3"):
        load_raw("cifar10", str(tmp_path), download=False)


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_set(str(folder))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    import pickle
    (folder / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="test_batch"):
        load_raw("cifar10", str(tmp_path), download=False)
    assert not (tmp_path / "pwned").exists()


def test_folder_dataset(tmp_path):
    from PIL import Image
    for split, n in (("train", 6), ("test", 2)):
        for cls, color in (("cats", (200, 10, 10)), ("dogs", (10, 10, 200))):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 30), color).save(d / f"{i}.png")
    a, b, c, d, info = load_raw("folder", str(tmp_path), image_size=16)
    assert a.shape == (12, 3, 16, 16) and c.shape == (4, 3, 16, 16) and info.classes == ["cats", "dogs"]
    assert b.tolist() == [0] * 6 + [1] * 6


def test_augment_keeps_shape_dtype_and_ink():
    x = torch.zeros(16, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10:18, 10:18] = 200  # ink well inside the 2-pixel shift range
    out = augment(x, batch_generator(0, 1, 0), aug_cfg(), style(True))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out.float().sum((1, 2, 3)), x.float().sum((1, 2, 3)))
    assert not torch.equal(out, x)  # 16 images, some shifted
    rgb = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    out = augment(rgb, batch_generator(0, 1, 0), aug_cfg(), style(False))
    assert out.shape == rgb.shape and out.dtype == torch.uint8
    assert torch.equal(augment(rgb, None, aug_cfg(augment=False), style(False)), rgb)


def test_augment_slice_matches_global_batch():
    """A rank's part of the global batch gets exactly what a single process would give it."""
    x = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    whole = augment(x, batch_generator(1, 2, 3), aug_cfg(), style(False))
    half = augment(x[4:], batch_generator(1, 2, 3), aug_cfg(), style(False), (4, 8))
    assert torch.equal(whole[4:], half)


def test_random_affine_rotates_per_image_and_keeps_ink():
    x = torch.zeros(32, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 6:22, 12:16] = 255  # a vertical bar: rotation turns it, so its columns spread
    cfg = aug_cfg(translate=0, rotate=30, scale=0.1)
    out = augment(x, batch_generator(0, 1, 0), cfg, style(True))
    assert out.shape == x.shape and out.dtype == torch.uint8
    mass = out.float().sum((1, 2, 3)) / x.float().sum((1, 2, 3))
    assert ((mass > 0.75) & (mass < 1.3)).all()  # zoom of +-10% changes the area by at most ~21%
    width = (out > 127).any(dim=2).sum((1, 2))  # columns touched by the bar, per image
    assert width.max() > 6 and len(set(width.tolist())) > 3  # turned, and by different angles
    half = augment(x[16:], batch_generator(0, 1, 0), cfg, style(True), (16, 32))
    assert torch.equal(out[16:], half)  # a rank's slice matches the global batch


def test_hflip_for_fashion_never_for_digits():
    x = torch.zeros(32, 1, 28, 28, dtype=torch.uint8)
    x[:, :, :, :5] = 255  # ink on the left edge only
    cfg = aug_cfg(translate=0)
    digits = augment(x, batch_generator(0, 1, 0), cfg, style(True, flip=False))
    clothes = augment(x, batch_generator(0, 1, 0), cfg, style(True, flip=True))
    assert torch.equal(digits, x)
    flipped = clothes[:, 0, 0, -1] == 255
    assert 5 < int(flipped.sum()) < 27 and torch.equal(clothes[flipped], x[flipped].flip(-1))


def test_trivial_augment_changes_images_by_one_op_each_and_slices_match():
    torch.manual_seed(0)
    x = torch.randint(30, 220, (256, 3, 16, 16), dtype=torch.uint8)
    out = trivial_augment(x, batch_generator(0, 1, 0), 0, 256)
    assert out.shape == x.shape and out.dtype == torch.uint8
    op = torch.randint(0, len(TRIVIAL_OPS), (256,), generator=batch_generator(0, 1, 0))  # the same first draw
    changed = (out != x).flatten(1).any(1)
    assert not changed[op == 0].any()  # identity
    assert changed[op != 0].float().mean() > 0.9  # every other op moves pixels (a weak draw may not)
    assert len(set(op.tolist())) == len(TRIVIAL_OPS)
    half = trivial_augment(x[100:], batch_generator(0, 1, 0), 100, 256)
    assert torch.equal(out[100:], half)
    cfg = aug_cfg(trivial_augment=True, translate=0)
    assert torch.equal(augment(x[:, :1], batch_generator(0, 1, 0), cfg, style(True)),
                       trivial_augment(x[:, :1], batch_generator(0, 1, 0), 0, 256))  # digits: one channel


def test_random_erasing_boxes():
    x = torch.zeros(200, 1, 28, 28, dtype=torch.uint8)
    assert torch.equal(random_erasing(x, 0.0, batch_generator(0, 1, 0), 0, 200), x)
    out = random_erasing(x, 1.0, batch_generator(0, 1, 0), 0, 200)
    area = (out > 0).float().mean((1, 2, 3))  # noise is 0 for 1 pixel in 256
    assert (area > 0.01).all() and (area < 0.38).all()  # 2-33% of the area, give or take rounding
    rows = (out > 0).any(3).squeeze(1).sum(1)  # a rectangle: its rows * cols ~ its area
    cols = (out > 0).any(2).squeeze(1).sum(1)
    assert ((rows * cols).float() / 784 >= area - 1e-6).all()
    some = random_erasing(x, 0.5, batch_generator(0, 1, 0), 0, 200)
    assert 60 < int((some > 0).flatten(1).any(1).sum()) < 140


def test_mixup_and_cutmix_lambda_is_what_was_mixed():
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 10, 10).contiguous()
    mixed, lam = mix_batch(x, batch_generator(0, 1, 0), 0.8, 0.0)
    assert 0 < lam < 1 and torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))
    for step in range(5):
        cut, lam = mix_batch(x, batch_generator(0, 1, step), 0.0, 1.0)
        kept = (cut == x).float().mean((1, 2, 3))
        assert torch.allclose(kept, torch.full((8,), lam))  # lam = the fraction of each image kept
        assert set(cut.unique().tolist()) <= set(range(8))


def test_normalize_resizes_on_device():
    x = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    y = normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 64)
    assert y.shape == (2, 3, 64, 64) and torch.allclose(y, torch.ones_like(y))


def test_shards_cover_each_item_once():
    for n in (1001, 7, 10000):
        for world in (1, 2, 3, 8):
            seen = []
            for r in range(world):
                lo, hi = shard_bounds(n, r, world)
                seen += list(range(lo, hi))
            assert seen == list(range(n))


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    a = epoch_permutation(100, 1, 2, "cpu")
    assert torch.equal(a, epoch_permutation(100, 1, 2, "cpu"))
    assert not torch.equal(a, epoch_permutation(100, 1, 3, "cpu"))
    assert sorted(a.tolist()) == list(range(100))


def test_shipped_mnist_is_the_real_one():
    raw = os.path.join(ROOT, "data", "MNIST", "raw")
    if not os.path.isfile(os.path.join(raw, "train-images-idx3-ubyte.gz")):
        pytest.skip("shipped MNIST not present")
    tx, ty, vx, vy, info = load_raw("mnist", os.path.join(ROOT, "data"), download=False)
    assert (len(tx), len(vx)) == (60000, 10000)
    assert torch.bincount(ty).min() > 5000


# ---------------------------------------------------------------------------- data from files

def colour_folder(root, n_train=24, n_test=6):
    """red and blue squares with noise, of several sizes: an ImageFolder tree."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls, rgb in (("blue", (30, 40, 200)), ("red", (210, 30, 30))):
            os.makedirs(os.path.join(root, split, cls))
            for i in range(n):
                a = np.clip(np.array(rgb) + rng.normal(0, 25, (20 + i % 5, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(os.path.join(root, split, cls, f"{i}.{'png' if i % 2 else 'jpg'}"))


@pytest.mark.slow
def test_folder_dataset_trains_evaluates_and_predicts(tmp_path, capsys):
    root = str(tmp_path / "photos")
    colour_folder(root)
    args = small_run_args(tmp_path, root, "data.dataset=folder", "model.image_size=16", "model.patch_size=4",
                          "train.batch_size=8", "train.epochs=3", "data.test_limit=0")
    assert train.main(args) == 0
    ckpt = str(tmp_path / "ckpt" / RUN / "folder_transformer_final.pth")
    saved = load_checkpoint(ckpt)
    assert saved["data_info"]["classes"] == ["blue", "red"] and saved["model_args"]["in_channels"] == 3
    history = saved["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_acc"] == 1.0
    capsys.readouterr()
    assert train.main(["--eval", "--checkpoint", ckpt] + args) == 0
    out = capsys.readouterr().out
    assert "Total Samples: 12" in out and "Global Accuracy: 100.00%" in out and "blue: 100.00% of 6" in out
    assert os.path.exists(tmp_path / "ckpt" / RUN / "folder_transformer_final_confusion.png")
    probe = tmp_path / "probe.png"
    Image.new("RGBA", (50, 30), (220, 20, 20, 255)).save(probe)
    assert infer.main(["--images", str(probe), "--checkpoint", ckpt, "--json", "--no-show",
                       "--output", str(tmp_path / "o")]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert result["label"] == "red" and len(result["probs"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MNIST, reason="shipped MNIST not present")
def test_regzipped_real_format_fashion_trains_offline(tmp_path, monkeypatch):
    """Real IDX files, re-gzipped (other checksums than upstream), in FashionMNIST/raw: trained
    with no download attempted."""
    src = os.path.join(ROOT, "data", "MNIST", "raw")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):  # the small t10k files stand in for both splits
        for kind in ("images-idx3", "labels-idx1"):
            with open(os.path.join(src, f"t10k-{kind}-ubyte.gz"), "rb") as f:
                original = f.read()
            packed = gzip.compress(gzip.decompress(original), compresslevel=1, mtime=1)
            assert hashlib.md5(packed).digest() != hashlib.md5(original).digest()
            (raw / f"{split}-{kind}-ubyte.gz").write_bytes(packed)

    def no_network(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(data, "_try_download", no_network)
    args = small_run_args(tmp_path, str(tmp_path), "data.dataset=fashion_mnist", "data.train_limit=320",
                          "data.test_limit=100", "train.epochs=1")
    assert train.main(args) == 0
    saved = load_checkpoint(str(tmp_path / "ckpt" / RUN / "fashion_mnist_transformer_final.pth"))
    assert saved["data_info"]["classes"] == data.FASHION and len(saved["history"]) == 1


def test_truncated_gzip_idx_names_the_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx_set(str(raw))
    p = raw / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz.*(corrupt|truncated)"):
        data.load_raw("mnist", str(tmp_path), download=False)


def test_cifar_count_mismatch_and_missing_batch_name_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_set(str(folder))
    with open(folder / "data_batch_2", "rb") as f:
        d = pickle.load(f)
    d[b"labels"] = d[b"labels"][:-1]
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(d, f, protocol=2)
    with pytest.raises(data.DataError, match="data_batch_2.*64 images but 63 labels"):
        data.load_raw("cifar10", str(tmp_path), download=False)
    (folder / "data_batch_2").unlink()
    with pytest.raises(data.DataError, match="missing data_batch_2"):
        data.load_raw("cifar10", str(tmp_path), download=False)


def test_cifar_from_the_original_archive(tmp_path):
    staging = tmp_path / "staging"
    write_cifar_set(str(staging / "cifar-10-batches-py"))
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    shutil.rmtree(staging)
    tx, ty, vx, vy, info = data.load_raw("cifar10", str(root), download=False)
    assert tx.shape == (320, 3, 32, 32) and vx.shape == (100, 3, 32, 32) and info.classes == data.CIFAR10


def test_a_folder_set_too_large_for_the_device_stays_in_host_memory(tmp_path, monkeypatch, caplog):
    import logging
    for k in range(2):
        os.makedirs(tmp_path / "train" / str(k))
        for i in range(5):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "train" / str(k) / f"{i}.png")
    cfg = OmegaConf.create({"data_root": str(tmp_path), "placement": "auto"})
    logger = logging.getLogger("placement")
    monkeypatch.setattr(data, "free_bytes", lambda device: 2 * 10 * 3 * 32 * 32 + 1)  # just enough room
    with caplog.at_level(logging.INFO, logger="placement"):
        assert not data.placement(cfg, 32, torch.device("cuda"), logger)
        monkeypatch.setattr(data, "free_bytes", lambda device: 2 * 10 * 3 * 32 * 32 - 1)  # half is too little
        assert data.placement(cfg, 32, torch.device("cuda"), logger)
    assert "10 files, at most 0 MB as uint8 at 32x32: kept in cuda" in caplog.text
    assert "kept in pinned host memory" in caplog.text
    assert not data.placement(OmegaConf.create({"data_root": str(tmp_path), "placement": "host"}), 32,
                              torch.device("cpu"), None)  # on the CPU the data is in host memory anyway


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_placement_trains_exactly_like_device_placement(tmp_path):
    from test_finetune import grey_folder
    grey_folder(str(tmp_path / "folder"))
    runs = []
    for where in ("device", "host"):
        args = small_run_args(tmp_path / where, tmp_path / "folder", "data.dataset=folder", "train.epochs=2",
                              "train.device=cuda", f"data.placement={where}", "train.batch_size=16")
        assert train.main(args) == 0
        runs.append([{k: v for k, v in r.items() if "time" not in k and "per_s" not in k}
                     for r in read_metrics(tmp_path / where / "logs" / RUN)])
    assert runs[0] == runs[1]
