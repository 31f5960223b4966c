"""export.py: each format gives the PyTorch logits back on real-format test images, model.json says
how to feed the model, infer.py and --eval read a safetensors export like a checkpoint, our
safetensors files agree with the safetensors package, and every user error is one line."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import export
import infer
from checkpoint import load_trained, save_checkpoint
from utils import read_safetensors, write_safetensors
from conftest import MNIST_INFO, ROOT, TINY_VIT, write_idx_set
from data import load_raw, normalize
from model import build_model

MODELS = {"vit": TINY_VIT, "vit_conv": dict(TINY_VIT, stem="conv"),
          "resnet": dict(TINY_VIT, name="resnet", dim=8, depth=1),
          "torchvision_vit": dict(TINY_VIT, name="torchvision_vit"),
          "vit32": dict(TINY_VIT, image_size=32, patch_size=8)}  # 28 px data resized to 32 on the way in
LINE = re.compile(r"^(\w+): max \|dlogit\| (\S+) over (\d+) (test images|random inputs), same prediction for "
                  r"(\d+)/(\d+)$", re.M)
N_TEST = 200  # test images in the IDX set below


def scrambled(model):
    """Every weight and buffer moved off its initial value, so zero-initialised heads and identity
    BatchNorm statistics cannot hide an export that drops them."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.rand(t.shape, generator=gen)
            t.copy_(0.5 + noise if name.endswith("running_var") else t + 0.2 * (noise - 0.5))
    return model.eval()


def weights_file(path, model_args, ema=False):
    """A train.py-style weights file with scrambled weights; with `ema`, different EMA weights beside
    them. Returns the model with the weights an export must carry (the EMA ones when present)."""
    torch.manual_seed(0)
    raw = scrambled(build_model(model_args))
    payload = {"format": 1, "model": raw.state_dict(), "model_args": dict(model_args), "data_info": dict(MNIST_INFO),
               "config": {}, "epoch": 3, "history": [{"epoch": 3, "val_acc": 0.75, "ema_val_acc": 0.8}]}
    if ema:
        averaged = scrambled(build_model(model_args))
        with torch.no_grad():
            for t in averaged.state_dict().values():
                if t.is_floating_point():
                    t.mul_(0.9)
        payload["ema_model"] = {"module." + k: v for k, v in averaged.state_dict().items()}
        raw = averaged
    save_checkpoint(path, payload)
    return raw


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, data_root, {model key: (weights file, reference model)}) shared by the tests."""
    base = tmp_path_factory.mktemp("export")
    data_root = str(base / "data")
    write_idx_set(os.path.join(data_root, "MNIST", "raw"), n_train=20, n_test=N_TEST)
    models = {k: (str(base / f"{k}.pth"), weights_file(str(base / f"{k}.pth"), args)) for k, args in MODELS.items()}
    return base, data_root, models


def run_export(capsys, *args):
    code = export.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def real_inputs(data_root, model_args, n=37):
    """The first n IDX test images, normalised as export.py and infer.py do; 37: not the traced batch."""
    x = load_raw("mnist", data_root, download=False)[2][:n]
    return normalize(x, MNIST_INFO["mean"], MNIST_INFO["std"], model_args["image_size"])


def own_runner(fmt, path):
    """The exported file loaded here, independently of export.py's own check."""
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
    if fmt == "pt2":
        return torch.export.load(path).module()
    return lambda x: load_trained(os.path.dirname(path))[0].eval()(x)


def check_format(fmt, key, setup, capsys, tmp_path):
    _, data_root, models = setup
    path, reference = models[key]
    code, out, err = run_export(capsys, "--checkpoint", path, "--format", fmt, "--output", tmp_path / fmt,
                                "--data-root", data_root)
    assert code == 0, err
    m = LINE.search(out)
    assert m and m.group(1) == fmt and m.group(4) == "test images", out
    assert int(m.group(3)) == N_TEST and m.group(5) == m.group(6) == str(N_TEST) and float(m.group(2)) <= 1e-4
    x = real_inputs(data_root, MODELS[key])
    with torch.no_grad():
        want, got = reference(x), own_runner(fmt, str(tmp_path / fmt / export.FILES[fmt]))(x)
    assert got.shape == (37, 10)
    assert float((got - want).abs().max()) <= 1e-4 and torch.equal(got.argmax(1), want.argmax(1))
    assert float(want.std()) > 0.1  # the logits differ between images and classes: the comparison means something
    return json.loads((tmp_path / fmt / "model.json").read_text())


@pytest.mark.parametrize("key", ["vit", "vit_conv", "resnet", "torchvision_vit"])
def test_safetensors_export_gives_the_pytorch_logits(key, setup, capsys, tmp_path):
    check_format("safetensors", key, setup, capsys, tmp_path)


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("onnx", marks=pytest.mark.slow)])
def test_graph_export_of_the_default_vit_gives_the_pytorch_logits(fmt, setup, capsys, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    check_format(fmt, "vit", setup, capsys, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("key", ["vit_conv", "resnet", "torchvision_vit", "vit32"])
def test_graph_export_of_every_model_gives_the_pytorch_logits(fmt, key, setup, capsys, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    check_format(fmt, key, setup, capsys, tmp_path)


def test_model_json_says_how_to_feed_the_model(setup, capsys, tmp_path):
    meta = check_format("safetensors", "vit32", setup, capsys, tmp_path)
    assert meta["format"] == "safetensors" and meta["file"] == "model.safetensors" and meta["weights"] == "raw"
    assert meta["classes"] == MNIST_INFO["classes"] and meta["dataset"] == "mnist"
    assert meta["model_args"] == MODELS["vit32"]
    assert meta["input"]["shape"] == ["batch", 1, 32, 32] and meta["input"]["image_size"] == 32
    assert meta["input"]["channels"] == 1 and meta["input"]["dtype"] == "float32"
    assert meta["output"]["shape"] == ["batch", 10] and "softmax" in meta["output"]["holds"]
    pre = meta["preprocessing"]
    assert pre["mean"] == [0.1307] and pre["std"] == [0.3081] and pre["native_size"] == 28
    assert pre["resize"]["size"] == [32, 32] and pre["resize"]["mode"] == "bilinear" and pre["scale"] == 1 / 255
    assert any("20 px of 28" in s for s in pre["image"]) and any("centre of mass" in s for s in pre["image"])
    assert meta["source"]["epoch"] == 3 and meta["source"]["val_acc"] == 0.75
    assert meta["source"]["checkpoint"] == os.path.abspath(setup[2]["vit32"][0])
    assert meta["check"]["count"] == N_TEST and meta["check"]["same_prediction"] == N_TEST


def test_safetensors_holds_the_ema_weights_when_the_run_kept_them(tmp_path, capsys, setup):
    path = str(tmp_path / "ema.pth")
    ema_model = weights_file(path, TINY_VIT, ema=True)
    code, out, err = run_export(capsys, "--checkpoint", path, "--format", "safetensors", "--output",
                                tmp_path / "st", "--data-root", setup[1], "--check-images", 20)
    assert code == 0, err
    saved, _ = read_safetensors(str(tmp_path / "st" / "model.safetensors"))
    want = ema_model.state_dict()
    assert sorted(saved) == sorted(want) and all(torch.equal(saved[k], want[k]) for k in want)
    meta = json.loads((tmp_path / "st" / "model.json").read_text())
    assert meta["weights"] == "EMA" and "EMA weights" in out


def test_infer_and_load_trained_read_the_export_like_the_pth(setup, capsys, tmp_path):
    _, data_root, models = setup
    path, reference = models["vit32"]
    assert run_export(capsys, "--checkpoint", path, "--format", "safetensors", "--output", tmp_path / "st",
                      "--data-root", data_root, "--check-images", 10)[0] == 0
    images = str(tmp_path / "images")  # a few of the sample photos: infer.py draws a figure for each
    os.makedirs(images)
    for name in sorted(os.listdir(os.path.join(ROOT, "test_digit")))[:2]:
        shutil.copy(os.path.join(ROOT, "test_digit", name), images)
    results = []
    for ckpt in (path, str(tmp_path / "st"), str(tmp_path / "st" / "model.safetensors")):
        assert infer.main(["--images", images, "--checkpoint", ckpt, "--json", "--no-show",
                           "--output", str(tmp_path / "fig")]) == 0
        results.append(json.loads(capsys.readouterr().out))
    probs = np.array([r["probs"] for r in results[0]])
    assert probs.shape == (2, 10) and np.abs(probs[0] - probs[1]).max() > 0.01  # the images get different answers
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a["file"] == b["file"] and a["pred"] == b["pred"]
            assert np.abs(np.array(a["probs"]) - np.array(b["probs"])).max() <= 1e-5
    model, ckpt, kind = load_trained(str(tmp_path / "st"))
    assert kind == "raw" and ckpt["model_args"] == MODELS["vit32"] and ckpt["data_info"] == MNIST_INFO
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(model.eval()(x), reference(x))


def broken_exports(folder, good):
    """name -> an export folder broken in one way, made from the good export `good`."""
    cases = {}
    for name in ("no_json", "no_weights", "truncated", "bad_json", "not_ours", "onnx"):
        cases[name] = os.path.join(folder, name)
        shutil.copytree(good, cases[name])
    os.remove(os.path.join(cases["no_json"], "model.json"))
    os.remove(os.path.join(cases["no_weights"], "model.safetensors"))
    weights = os.path.join(cases["truncated"], "model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[:len(data) // 2])
    with open(os.path.join(cases["bad_json"], "model.json"), "w") as f:
        f.write('{"format": "safetensors", ')
    for name, edit in (("not_ours", lambda m: m.pop("preprocessing")), ("onnx", lambda m: m.update(format="onnx"))):
        meta_path = os.path.join(cases[name], "model.json")
        with open(meta_path) as f:
            meta = json.load(f)
        edit(meta)
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    return cases


def test_a_broken_export_folder_is_a_one_line_error(setup, capsys, tmp_path):
    assert run_export(capsys, "--checkpoint", setup[2]["vit"][0], "--format", "safetensors", "--output",
                      tmp_path / "good", "--data-root", setup[1], "--check-images", 4)[0] == 0
    words = {"no_json": "has no model.json", "no_weights": "model.safetensors is missing",
             "truncated": "not a readable safetensors file", "bad_json": "cannot be read",
             "not_ours": "has no preprocessing", "onnx": "holds onnx"}
    for name, folder in broken_exports(str(tmp_path), str(tmp_path / "good")).items():
        code = infer.main(["--images", os.path.join(ROOT, "test_digit"), "--checkpoint", folder, "--no-show"])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and words[name] in err, (name, err)


def test_bad_arguments_exit_2_with_one_line(setup, capsys, tmp_path):
    ckpt = setup[2]["vit"][0]
    cases = [(["--checkpoint", ckpt, "--format", "tflite", "--output", tmp_path], "invalid choice: 'tflite'"),
             (["--checkpoint", tmp_path / "none.pth", "--format", "pt2", "--output", tmp_path], "not found"),
             (["--checkpoint", ckpt], "required: --output"),
             (["--checkpoint", ckpt, "--output", tmp_path, "--check-images", 0], "--check-images 0 must be >= 1"),
             (["--checkpoint", ckpt, "--output", tmp_path, "--opset", 11], "opset 14 or newer")]
    for args, words in cases:
        code, out, err = run_export(capsys, *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, (args, err)
    assert os.listdir(tmp_path) == []


def test_a_missing_optional_package_names_the_pip_command(setup, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    code, out, err = run_export(capsys, "--checkpoint", setup[2]["vit"][0], "--format", "onnx",
                                "--output", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: --format onnx needs onnx and onnxruntime; pip install onnx onnxruntime onnxscript")
    assert not (tmp_path / "o").exists()  # nothing loaded or written before the check


def test_a_failed_check_exits_1_and_writes_no_model_json(setup, capsys, tmp_path, monkeypatch):
    args = ["--checkpoint", setup[2]["vit"][0], "--format", "safetensors", "--data-root", setup[1]]
    real = export.RUNNERS["safetensors"]
    monkeypatch.setitem(export.RUNNERS, "safetensors", lambda p, a: (lambda x: real(p, a)(x) + 2e-4))
    code, out, err = run_export(capsys, *args, "--output", tmp_path / "off")
    assert code == 1 and "max |dlogit| 2.0e-04" in out and "tolerance 0.0001" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "off") == ["model.safetensors"]
    monkeypatch.setitem(export.RUNNERS, "safetensors", lambda p, a: (lambda x: real(p, a)(x).flip(1)))
    code, out, err = run_export(capsys, *args, "--output", tmp_path / "flip", "--tolerance", 100)
    assert code == 1 and "prediction(s) differ" in err and not (tmp_path / "flip" / "model.json").exists()
    same = int(LINE.search(out).group(5))
    assert same < N_TEST


def test_without_the_data_set_it_checks_random_inputs_and_says_so(setup, capsys, tmp_path):
    code, out, err = run_export(capsys, "--checkpoint", setup[2]["vit"][0], "--format", "safetensors",
                                "--output", tmp_path / "st", "--data-root", tmp_path / "empty", "--check-images", 50)
    assert code == 0, err
    assert "checking on random inputs instead" in out
    m = LINE.search(out)
    assert m.group(4) == "random inputs" and m.group(3) == m.group(5) == "50"
    assert json.loads((tmp_path / "st" / "model.json").read_text())["check"]["inputs"] == "random inputs"


def test_an_exporter_failure_is_one_line(setup, capsys, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("Unsupported operator aten::frobnicate\nlong trace")
    monkeypatch.setattr(torch.export, "export", refuse)
    code, out, err = run_export(capsys, "--checkpoint", setup[2]["resnet"][0], "--format", "pt2",
                                "--output", tmp_path / "p", "--data-root", setup[1])
    assert code == 1 and err.count("\n") == 1
    assert "cannot export model.name=resnet (RuntimeError: Unsupported operator aten::frobnicate)" in err


# ---------------------------------------------------------------------------------- safetensors

def every_dtype():
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 5, generator=gen), "half": torch.randn(4, generator=gen).half(),
            "bf": torch.randn(2, 2, generator=gen).bfloat16(), "f64": torch.randn(3, generator=gen).double(),
            "count": torch.tensor(7), "i32": torch.arange(-3, 3, dtype=torch.int32),
            "i8": torch.tensor([-128, 0, 127], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
            "flags": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}


def same_tensors(a, b):
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_safetensors_round_trip_of_every_dtype(tmp_path):
    tensors = every_dtype()
    write_safetensors(str(tmp_path / "a.safetensors"), tensors, {"format": "pt", "n": 3})
    back, meta = read_safetensors(str(tmp_path / "a.safetensors"))
    assert same_tensors(back, tensors) and meta == {"format": "pt", "n": "3"}
    raw = (tmp_path / "a.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0 and header["w"]["dtype"] == "F32" and header["w"]["shape"] == [3, 5]
    assert all(e["data_offsets"][0] % torch.empty((), dtype=tensors[k].dtype).element_size() == 0
               for k, e in header.items() if k != "__metadata__")  # every tensor aligned to its element size


def test_safetensors_files_agree_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = every_dtype()
    write_safetensors(str(tmp_path / "ours.safetensors"), tensors)
    assert same_tensors(st.load_file(str(tmp_path / "ours.safetensors")), tensors)
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    back, meta = read_safetensors(str(tmp_path / "theirs.safetensors"))
    assert same_tensors(back, tensors) and meta == {"k": "v"}


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw[:5], "truncated"),
    (lambda raw: raw[:8] + b"[" + raw[9:], "not JSON"),
    (lambda raw: raw[:-4], "do not match"),
    (lambda raw: raw + b"\0" * 4, "bytes after the last tensor"),
    (lambda raw: raw.replace(b'"F32"', b'"F31"', 1), "unknown dtype"),
])
def test_a_damaged_safetensors_file_says_what_is_wrong(tmp_path, damage, words):
    path = tmp_path / "a.safetensors"
    write_safetensors(str(path), {"a": torch.ones(4), "b": torch.zeros(2, 2)})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=words):
        read_safetensors(str(path))


# ------------------------------------------------------------------------------- fresh process

FRESH = {
    # onnxruntime and numpy only: no torch, no file of this repository
    "onnx": "import sys, numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
            "np.save(sys.argv[3], s.run(['logits'], {'input': np.load(sys.argv[2])})[0])\n",
    "pt2": "import sys, numpy as np, torch\n"
           "m = torch.export.load(sys.argv[1]).module()\n"
           "np.save(sys.argv[3], m(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy())\n",
}
# the toolkit's own modules cannot even be found from there
CLEAN = "import importlib.util as u\nassert not any(u.find_spec(m) for m in ('model', 'checkpoint', 'export'))\n"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_the_export_runs_in_a_fresh_process_without_the_repository(fmt, setup, capsys, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    _, data_root, models = setup
    path, reference = models["vit_conv"]
    assert run_export(capsys, "--checkpoint", path, "--format", fmt, "--output", tmp_path / "x",
                      "--data-root", data_root, "--check-images", 10)[0] == 0
    x = real_inputs(data_root, MODELS["vit_conv"], n=N_TEST)
    np.save(tmp_path / "x.npy", x.numpy())
    code = FRESH[fmt] + CLEAN
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path / "x" / export.FILES[fmt]),
                           str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = torch.from_numpy(np.load(tmp_path / "y.npy"))
    with torch.no_grad():
        want = reference(x)
    assert got.shape == (N_TEST, 10)
    assert float((got - want).abs().max()) <= 1e-4 and torch.equal(got.argmax(1), want.argmax(1))


def test_is_export_tells_exports_from_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mnist_transformer_final.pth").write_bytes(b"")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "model.json").write_text("{}")
    assert not checkpoint.is_export(str(tmp_path / "run"))
    assert not checkpoint.is_export(str(tmp_path / "run" / "mnist_transformer_final.pth"))
    assert checkpoint.is_export(str(tmp_path / "exp")) and checkpoint.is_export(str(tmp_path / "x.safetensors"))


def test_eval_scores_the_export_as_it_scores_the_pth(setup, capsys, tmp_path):
    import train
    _, data_root, models = setup
    path = models["vit"][0]
    assert run_export(capsys, "--checkpoint", path, "--format", "safetensors", "--output", tmp_path / "st",
                      "--data-root", data_root, "--check-images", 4)[0] == 0
    common = [f"data.data_root={data_root}", "train.device=cpu", f"log.dir={tmp_path}/logs",
              f"checkpoint.dir={tmp_path}/ckpt", "log.tensorboard=false"]
    scores = []
    for ckpt in (path, str(tmp_path / "st") + os.sep):
        assert train.main(["--eval", "--checkpoint", ckpt] + common) == 0
        out = capsys.readouterr().out
        scores.append([line for line in out.splitlines() if line.startswith(("Total", "Global"))])
    assert scores[0] == scores[1] and scores[0][0] == f"Total Samples: {N_TEST}"
    assert os.path.isfile(tmp_path / "st_confusion.png")  # beside the export folder, not inside it
