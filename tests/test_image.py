"""The container image without a Docker engine: its file tree is built from the Dockerfile's own
WORKDIR and COPY lines (with .dockerignore applied) in a temporary folder, and the ENTRYPOINT runs
there, so a file the image lacks fails here as it would in a pod."""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def dockerfile():
    """(WORKDIR, [(sources, destination)], ENTRYPOINT list) from the Dockerfile."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        lines = re.sub(r"\\\n", " ", f.read()).splitlines()
    workdir, copies, entrypoint = "/", [], None
    for line in lines:
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        op, rest = words[0].upper(), words[1] if len(words) > 1 else ""
        if op == "WORKDIR":
            workdir = os.path.join(workdir, rest.strip())
        elif op == "COPY" and "--from" not in rest:
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            copies.append((parts[:-1], parts[-1]))
        elif op == "ENTRYPOINT":
            entrypoint = json.loads(rest)
    return workdir, copies, entrypoint


def _regex(pattern):
    """A .dockerignore pattern: ** crosses folders, * and ? do not."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(rel, patterns):
    """.dockerignore: the last pattern that matches the path or one of its parent folders wins."""
    parts, out = rel.split("/"), False
    for pattern in patterns:
        regex = _regex(pattern.lstrip("!"))
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            out = not pattern.startswith("!")
    return out


def build_tree(dest):
    """The image's WORKDIR as a folder under `dest`; returns (that folder, the entrypoint)."""
    workdir, copies, entrypoint = dockerfile()
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        patterns = [p.strip().rstrip("/") for p in f if p.strip() and not p.startswith("#")]
    root = os.path.join(dest, workdir.strip("/"))
    for sources, target in copies:
        for src in sources:
            for path in sorted(glob.glob(os.path.join(ROOT, src))):
                files = [path] if os.path.isfile(path) else [
                    p for p in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(p)]
                for file in files:
                    rel = os.path.relpath(file, ROOT)
                    if ignored(rel, patterns):
                        continue
                    inside = os.path.relpath(file, path) if os.path.isdir(path) else os.path.basename(file)
                    out = os.path.join(root, target, inside) if target.endswith("/") else os.path.join(root, target)
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    shutil.copy2(file, out)
    return root, entrypoint


def test_the_tree_holds_what_a_run_needs_and_nothing_of_the_tests(tmp_path):
    root, entrypoint = build_tree(str(tmp_path))
    assert entrypoint[:2] == ["python", "train.py"]
    for need in ("train.py", "config.yaml", "configs/mnist.yaml", "data/MNIST/raw/train-images-idx3-ubyte.gz",
                 "test_digit"):
        assert os.path.exists(os.path.join(root, need)), need
    assert not os.path.exists(os.path.join(root, "tests")) and not glob.glob(os.path.join(root, "**", "*.pyc"))
    assert ignored("data/FashionMNIST/raw/x.gz", ["data/*", "!data/MNIST"])
    assert not ignored("data/MNIST/raw/x.gz", ["data/*", "!data/MNIST", "data/MNIST/*", "!data/MNIST/raw"])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--config", "configs/mnist.yaml"]], ids=["default", "mnist_preset"])
def test_the_entrypoint_trains_from_the_image_tree(tmp_path, extra):
    if not os.path.isfile(os.path.join(ROOT, "data", "MNIST", "raw", "train-images-idx3-ubyte.gz")):
        pytest.skip("shipped MNIST not present")
    root, entrypoint = build_tree(str(tmp_path / "image"))
    quick = ["train.epochs=1", "data.train_limit=640", "data.test_limit=200", "train.device=cpu",
             "log.tensorboard=false", f"checkpoint.dir={tmp_path}/ckpt", f"log.dir={tmp_path}/logs"]
    cmd = [sys.executable] + entrypoint[1:] + extra + quick  # docker run IMAGE ARGS appends ARGS
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH="", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert glob.glob(str(tmp_path / "ckpt" / "*" / "mnist_transformer_final.pth"))
    with open(glob.glob(str(tmp_path / "logs" / "*" / "config.yaml"))[0]) as f:
        assert ("stem: conv" in f.read()) == bool(extra)  # the preset was read from the image's configs/
