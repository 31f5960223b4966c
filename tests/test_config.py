import os

import pytest

from conftest import run_cli
from utils import UserError, load_config


def test_defaults_load_and_are_read_only():
    cfg = load_config()
    assert cfg.data.dataset == "mnist" and cfg.model.name == "vit"
    with pytest.raises(Exception, match="read-only"):
        cfg.train.epochs = 3


def test_precedence_file_then_profile_then_cli(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  epochs: 7\n  lr: 0.01\ndata:\n  data_root: /from/preset\n")
    cfg = load_config(str(preset), ["train.lr=0.5"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.data_root) == (7, 0.5, "/from/preset")
    k8s = load_config(str(preset), ["environment=k8s"])
    assert k8s.data.data_root == "/data"  # the profile beats the preset
    assert (k8s.checkpoint.dir, k8s.log.dir) == ("/checkpoints", "/logs")
    assert load_config(str(preset), ["environment=k8s", "data.data_root=/mine"]).data.data_root == "/mine"


@pytest.mark.parametrize("overrides, key, words", [
    (["train.epochs=-1"], "train.epochs", ">= 1"),
    (["train.lr=abc"], "train.lr", "a number"),
    (["train.lr=0"], "train.lr", "> 0"),
    (["model.patch_size=5"], "model.patch_size", "does not divide"),
    (["data.dataset=imagenet"], "data.dataset", "mnist|fashion_mnist|cifar10|folder"),
    (["trian.epochs=1"], "trian.epochs", "unknown config key"),
    (["train.epoch=1"], "train.epoch", "train.epochs"),
    (["train.batch_size=0"], "train.batch_size", ">= 1"),
    (["model.dim=30", "model.heads=4"], "model.dim", "divisible"),
    (["model.name=resnet9"], "model.name", "vit|torchvision_vit|resnet"),
    (["checkpoint.resume=maybe"], "checkpoint.resume", "true|false|auto"),
    (["model.stem=conv", "model.name=torchvision_vit"], "model.stem", "model.name=vit"),
    (["model.stem=conv", "model.name=resnet"], "model.stem", "model.name=vit"),
    (["train.ema_decay=1"], "train.ema_decay", "< 1"),
    (["train.epochs=1.5"], "train.epochs", "an integer"),
    (["model.dropout=1.5"], "model.dropout", "< 1"),
    (["train.epochs"], "train.epochs", "key.sub=value"),
])
def test_bad_values_name_the_key(overrides, key, words):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert key in msg and words in msg and "\n" not in msg


def test_off_is_the_word_off_not_false(tmp_path):
    # YAML reads a bare `off` as false; train.amp's value `off` must still work from file and CLI
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  amp: off\n")
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    assert load_config(str(preset)).train.amp == "off"
    with pytest.raises(UserError, match="train.amp"):
        load_config(None, ["train.amp=true"])


def test_unknown_key_in_preset_file(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  dimm: 3\n")
    with pytest.raises(UserError, match=r"model\.dimm.*p\.yaml"):
        load_config(str(preset))


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["train.epochs=-1"], "train.epochs"),
    (["train.lr=abc"], "train.lr"),
    (["model.patch_size=5"], "model.patch_size"),
    (["data.dataset=imagenet"], "data.dataset"),
    (["trian.epochs=1"], "trian.epochs"),
    (["--config", "missing.yaml"], "missing.yaml"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.device=cuda"], "train.device=cuda"),
    (["model.dim=30", "model.heads=4"], "model.dim"),
])
def test_cli_errors_are_one_line_without_traceback(args, needle):
    r = run_cli(["train.py"] + args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.slow
def test_missing_cifar_without_network_lists_the_files(tmp_path):
    r = run_cli(["train.py", "data.dataset=cifar10", f"data.data_root={tmp_path}", "data.download=false",
                 f"log.dir={tmp_path}/logs", f"checkpoint.dir={tmp_path}/ckpt", "log.tensorboard=false"])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "data_batch_1" in r.stderr and "test_batch" in r.stderr
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in r.stderr


@pytest.mark.slow
def test_output_into_a_closed_pipe_is_no_traceback():
    """`python infer.py --json | head -c 100` and the like: the reader has gone, the program stops
    quietly with 1. train.py, infer.py and bench.py all end with utils.exit_with(main)."""
    import subprocess
    import sys
    from conftest import ROOT
    for script in ("train.py", "infer.py", "bench.py"):
        with open(os.path.join(ROOT, script)) as f:
            assert f.read().rstrip().endswith("exit_with(main)")
    code = "import utils; utils.exit_with(lambda: print('x' * 100000) or 0)"
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 1 and r.stderr == "", r.stderr
