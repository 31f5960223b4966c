"""Bad input, careless or hostile, ends the same way everywhere: a non-zero exit, one line that
names the cause and the fix, no traceback, and nothing lost or left half-written."""
import errno
import json
import gzip
import io
import os
import pickle
import stat
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import infer
import train
from checkpoint import load_checkpoint, load_trained
from conftest import MNIST_INFO, ROOT, RUN, TINY_VIT, idx_bytes, small_run_args, tiny_weights_file, write_cifar_set
from data import DataError, load_folder, load_raw, read_idx
from runs import RunLock
from utils import UserError, load_config


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ------------------------------------------------------------------------ numbers in the config

@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=1e999", "train.lr=.nan", "train.lr=-.inf",
                                      "train.early_stop_min_delta=.nan", "data.scale=.nan", "model.mlp_ratio=.inf",
                                      "train.grad_clip=1e400", "data.val_split=.nan"])
def test_non_finite_numbers_are_refused_naming_the_key(override):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(override.split("=")[0]) and "finite" in str(e.value)


def test_non_finite_numbers_in_a_file_a_preset_or_a_profile(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: .inf\n")
    with pytest.raises(UserError, match="train.lr=inf is not a finite number"):
        load_config(str(preset))
    preset.write_text("profiles:\n  k8s:\n    train:\n      weight_decay: .nan\n")
    load_config(str(preset))  # the local profile is fine
    with pytest.raises(UserError, match="train.weight_decay=nan"):
        load_config(str(preset), ["environment=k8s"])
    assert train.main(["train.lr=.inf"]) == 2
    assert "train.lr" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("overrides, key", [
    (["train.lr=${train.nope}"], "train.lr"), (["environment=${oops}"], "environment"),
    (["data.data_root=${oc.env:SURELY_UNSET_VARIABLE_4711}"], "data.data_root")])
def test_an_interpolation_that_fails_names_the_key(overrides, key, capsys):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(f"{key}: its value cannot be resolved") and "\n" not in str(e.value)
    assert train.main(overrides) == 2
    assert key in one_line(capsys.readouterr().err)


def test_an_interpolation_that_works_is_resolved_once():
    cfg = load_config(None, ["train.eval_batch_size=${train.batch_size}"])
    assert cfg.train.eval_batch_size == 64 and "${" not in str(cfg.train)


# --------------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_output_folders_are_checked_before_any_work(tmp_path, mnist_root, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    target = blocker if where == "file" else blocker / "sub"
    assert train.main(small_run_args(tmp_path, mnist_root) + [f"checkpoint.dir={target}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "checkpoint.dir" in line and str(target) in line and not (tmp_path / "logs" / RUN).exists()


@pytest.mark.slow
@pytest.mark.parametrize("fails", ["checkpoint", "metrics"])
def test_a_full_disk_mid_run_is_one_line_and_the_last_checkpoint_stays_whole(tmp_path, mnist_root, monkeypatch,
                                                                              capsys, fails):
    real_save, real_append, saves = checkpoint.save_checkpoint, train.Loggers.epoch, []

    def save(path, payload):
        saves.append(path)
        if os.path.basename(path) == "epoch_002.pt":
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(path, payload)

    def epoch(self, record, history):
        if record["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", self.metrics_path)
        real_append(self, record, history)
    if fails == "checkpoint":
        monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    else:
        monkeypatch.setattr(train.Loggers, "epoch", epoch)
    assert train.main(small_run_args(tmp_path, mnist_root, "train.epochs=3")) == 1
    line = one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "checkpoint.resume=true" in line
    assert load_checkpoint(str(tmp_path / "ckpt" / RUN / "epoch_001.pt"))["epoch"] == 1
    assert not [n for n in os.listdir(tmp_path / "ckpt" / RUN) if ".tmp." in n]


def test_a_second_process_on_the_same_run_is_refused(tmp_path, mnist_root, capsys):
    held = RunLock(str(tmp_path / "ckpt" / RUN))
    held.claim()
    assert train.main(small_run_args(tmp_path, mnist_root)) == 201  # a retry may succeed once the holder ends
    line = one_line(capsys.readouterr().err)
    assert f"pid {os.getpid()}" in line and "run.name" in line
    held.file.close()


# ------------------------------------------------------------------------ checkpoint metadata

@pytest.mark.parametrize("edit, words", [
    (lambda c: c["model_args"].update(dim="32"), "model_args.dim='32' is not an integer"),
    (lambda c: c["model_args"].update(name="transformer9000"), "model_args.name='transformer9000'"),
    (lambda c: c["model_args"].update(dim=8192, depth=16, heads=8), "parameters, more than"),
    (lambda c: c["model_args"].update(mlp_ratio=float("nan")), "model_args.mlp_ratio=nan"),
    (lambda c: c["model_args"].update(patch_size=5), "do not build a model"),
    (lambda c: c["model_args"].update(extra=1), r"unknown keys \['extra'\]"),
    (lambda c: c["data_info"].pop("classes"), "data_info.classes"),
    (lambda c: c["data_info"].update(classes=["a", "b"]), "names 2 classes but the model has 10"),
    (lambda c: c["data_info"].update(std=[0.0]), "data_info.std"),
    (lambda c: c["data_info"].update(native_size=10**9), "data_info.native_size"),
    (lambda c: c.update(data_info="mnist"), "data_info is not a mapping"),
])
def test_crafted_checkpoint_metadata_is_one_line(tmp_path, capsys, edit, words):
    path = str(tmp_path / "w.pth")
    tiny_weights_file(path)
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=words):
        load_trained(path)
    assert infer.main(["--checkpoint", path, "--images", os.path.join(ROOT, "test_digit"), "--no-show"]) == 1
    assert words.replace("\\", "")[:12] in one_line(capsys.readouterr().err)


def test_a_resume_from_an_edited_training_checkpoint_is_one_line(tmp_path):
    from test_checkpoint import make_run, saver, trained_state
    cfg, ctx, t = make_run(tmp_path)
    saver(tmp_path, cfg, ctx).end_of_epoch(t, trained_state(t, 1), improved=False, last=False)
    path = str(tmp_path / "ckpt" / "epoch_001.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["optimizer"]["param_groups"][0]["params"] = [0]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"cannot be resumed .*\(checkpoint.resume_epoch=N\)"):
        saver(tmp_path, cfg, ctx, resume=True).resume(t, checkpoint.TrainState())


# ------------------------------------------------------------------------------- data files

def test_an_idx_header_that_overflows_is_caught(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    header = bytes([0, 0, 8, 3]) + b"".join(int(2**31 + 1).to_bytes(4, "big") for _ in range(3))
    path.write_bytes(header + bytes(100))  # 2**93 images' worth of header, 100 bytes of data
    with pytest.raises(DataError, match="holds 100 data bytes but its header says"):
        read_idx(str(path), 3)
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)))[:-8])  # cut inside the stream
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        read_idx(str(path), 3)


@pytest.mark.parametrize("labels, data", [([2**70] * 64, None), (["cat"] * 64, None), (None, "text"),
                                          (None, np.zeros((64, 3072), np.float64))])
def test_malformed_cifar_values_name_the_file(tmp_path, labels, data):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_set(str(folder))
    with open(folder / "data_batch_3", "rb") as f:
        d = pickle.load(f)
    if labels is not None:
        d[b"labels"] = labels
    if data is not None:
        d[b"data"] = data
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump(d, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_3"):
        load_raw("cifar10", str(tmp_path), download=False)


def test_cifar_archive_members_land_as_plain_files_of_this_user(tmp_path):
    staging = tmp_path / "staging"
    write_cifar_set(str(staging))
    archive = tmp_path / "root" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in sorted(os.listdir(staging)):
            info = tar.gettarinfo(str(staging / name), arcname=f"cifar-10-batches-py/{name}")
            info.mode, info.uid, info.gid, info.uname, info.gname = 0o6777, 4321, 4321, "mallory", "mallory"
            if name == "data_batch_2":  # a link where a batch should be: never followed, never created
                info.type, info.linkname, info.size = tarfile.SYMTYPE, "/etc/passwd", 0
                tar.addfile(info)
                continue
            with open(staging / name, "rb") as f:
                tar.addfile(info, f)
    with pytest.raises(DataError, match="missing data_batch_2"):
        load_raw("cifar10", str(tmp_path / "root"), download=False)
    out = tmp_path / "root" / "cifar-10-batches-py"
    assert not os.path.lexists(out / "data_batch_2")
    for name in os.listdir(out):
        st = os.lstat(out / name)
        assert stat.S_ISREG(st.st_mode) and not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH)
        assert st.st_uid == os.getuid()


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    for split in ("train", "test"):
        for cls, level in (("dark", 4000), ("light", 60000)):
            os.makedirs(tmp_path / split / cls)
            for i in range(3):
                a = np.full((20, 20), level + 100 * i, dtype=np.uint16)
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="PNG")  # a 16-bit greyscale PNG (mode I;16)
                (tmp_path / split / cls / f"{i}.png").write_bytes(buf.getvalue())
    ((tx, ty), _, _), info = load_folder(str(tmp_path), 16)
    assert info.in_channels == 1 and tx.shape == (6, 1, 16, 16)
    means = [float(tx[ty == k].float().mean()) for k in (0, 1)]
    assert abs(means[0] - 4100 / 257) < 1.5 and abs(means[1] - 60100 / 257) < 1.5  # 16 and 234, not 255 and 255


def test_model_args_must_stay_positive_integers():
    for bad in (0, -1, True, 2.5):
        with pytest.raises(UserError):
            checkpoint.check_model_args(dict(TINY_VIT, depth=bad), "x.pth")
    assert checkpoint.check_model_args(dict(TINY_VIT), "x.pth") > 0
    checkpoint.check_data_info(dict(MNIST_INFO), dict(TINY_VIT), "x.pth")


# ----------------------------------------------------------------------------------- infer.py

def grey_png(path, level=30):
    Image.fromarray(np.full((40, 30), level, np.uint8)).save(path)


def test_a_file_name_that_is_not_utf8_gets_its_own_row(tmp_path, capsys):
    ckpt, folder = str(tmp_path / "w.pth"), tmp_path / "imgs"
    tiny_weights_file(ckpt)
    folder.mkdir()
    grey_png(folder / "plain.png")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:  # Latin-1 bytes, not UTF-8
        Image.fromarray(np.full((40, 30), 200, np.uint8)).save(f, format="PNG")
    out = str(tmp_path / "out")
    assert infer.main(["--images", str(folder), "--checkpoint", ckpt, "--no-show", "--output", out]) == 0
    table = capsys.readouterr().out
    assert "caf\ufffd.png" in table and "plain.png" in table and "figures: 2" in table
    assert infer.main(["--images", str(folder), "--checkpoint", ckpt, "--json", "--output", out]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["pred"] is not None for r in rows] == [True, True] and len({r["figure"] for r in rows}) == 2
    assert all(os.path.exists(r["figure"]) for r in rows)


def test_figure_names_never_collide(tmp_path, capsys):
    ckpt, folder = str(tmp_path / "w.pth"), tmp_path / "imgs"
    tiny_weights_file(ckpt)
    folder.mkdir()
    for name in ("a.png", "a.jpg", "a_png.png", "a_jpg.png", "b.bmp"):
        Image.fromarray(np.full((40, 30), 30, np.uint8)).convert("RGB").save(folder / name)
    out = tmp_path / "out"
    assert infer.main(["--images", str(folder), "--checkpoint", ckpt, "--json", "--output", str(out)]) == 0
    figures = [r["figure"] for r in json.loads(capsys.readouterr().out)]
    assert len(figures) == 5 and len(set(figures)) == 5 and sorted(os.listdir(out)) == sorted(map(os.path.basename,
                                                                                                   figures))


def test_a_sixteen_bit_photo_is_scaled_for_a_colour_model_and_in_its_figure(tmp_path):
    im = Image.fromarray(np.full((40, 30), 20000, np.uint16))  # mode I;16: 20000 / 65535 of white
    info = dict(MNIST_INFO, dataset="folder", digit_style=False, in_channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    x = infer.prepare(im, info)
    assert x.shape == (3, 28, 28) and abs(int(x.mean()) - round(20000 / 257)) <= 1  # not clipped to 255
    assert infer.prepare(im, dict(info, in_channels=1)).shape == (1, 28, 28)  # a grey folder model
    path = str(tmp_path / "fig.png")
    infer.save_figure(path, (im, x), torch.full((10,), 0.1), MNIST_INFO["classes"], "t", keep_open=False)
    panel = np.asarray(Image.open(path).convert("L"))
    h, w = panel.shape
    assert panel[h // 3: 2 * h // 3, w // 12: w // 5].mean() < 150  # the original shows dark grey, not white


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    ckpt = str(tmp_path / "w.pth")
    tiny_weights_file(ckpt)
    (tmp_path / "taken").write_text("x")
    args = ["--images", os.path.join(ROOT, "test_digit"), "--checkpoint", ckpt, "--output", str(tmp_path / "taken")]
    assert infer.main(args + ["--no-show"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "--output" in line and "is not a folder" in line


def test_weights_that_are_not_tensors_and_a_missing_init_from_are_one_line(tmp_path):
    path = str(tmp_path / "w.pth")
    tiny_weights_file(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="'model' is not a mapping of names to tensors"):
        load_trained(path)
    with pytest.raises(UserError, match="model.init_from=/nonexistent: no such file or folder"):
        checkpoint.init_weights(torch.nn.Linear(1, 1), "/nonexistent")
