"""Write a small image-folder data set from IDX files (MNIST or Fashion-MNIST), and give a
3-nearest-neighbour baseline on raw pixels for it.

    python tests/folder_set.py OUT --idx DATA/FashionMNIST/raw --train-per-class 200 --test-per-class 200
    python tests/folder_set.py OUT --knn          # 3-NN test accuracy on OUT's train/ and test/

OUT gets train/<class>/<n>.png and test/<class>/<n>.png (8-bit grey PNGs), drawn per class with
a fixed seed from the IDX training and test splits. The kNN baseline reads the folder through the
toolkit's own loader, so both see the same pixels.
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import load_folder, load_idx_split  # noqa: E402


def write_split(out, images, labels, per_class, seed):
    rng = np.random.default_rng(seed)
    for k in range(10):
        os.makedirs(os.path.join(out, str(k)), exist_ok=True)
        pick = rng.choice(np.flatnonzero(labels == k), per_class, replace=False)
        for n, i in enumerate(sorted(pick)):
            Image.fromarray(images[i, 0]).save(os.path.join(out, str(k), f"{n:04d}.png"))


def knn_accuracy(root, k=3):
    """k-nearest-neighbour (Euclidean, raw pixels in 0..1) test accuracy of a folder data set."""
    ((tx, ty), _, (vx, vy)), _ = load_folder(root, 28)
    a, b = tx.flatten(1).float() / 255, vx.flatten(1).float() / 255
    nearest = torch.cdist(b, a).topk(k, largest=False).indices  # (test, k)
    votes = torch.nn.functional.one_hot(ty[nearest], ty.max() + 1).sum(1).float()
    votes += torch.nn.functional.one_hot(ty[nearest[:, 0]], ty.max() + 1) * 0.5  # ties go to the nearest
    return float((votes.argmax(1) == vy).float().mean()), len(ty), len(vy)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--idx", help="folder with the four IDX files (train-images-idx3-ubyte.gz ...)")
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--knn", action="store_true", help="print the 3-NN baseline of OUT and exit")
    args = p.parse_args()
    if not args.knn:
        for split, train, n in (("train", True, args.train_per_class), ("test", False, args.test_per_class)):
            images, labels = load_idx_split(args.idx, train)
            write_split(os.path.join(args.out, split), images.numpy(), labels.numpy(), n, args.seed)
    acc, n_train, n_test = knn_accuracy(args.out)
    print(f"3-NN on raw pixels: {100 * acc:.2f}% of {n_test} test images ({n_train} training images)")


if __name__ == "__main__":
    main()
