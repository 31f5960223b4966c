"""The DataLoader baseline that bench.py compares with: the usual tutorial pipeline at the same
model dims (or a typical tutorial ViT's): torchvision per-sample transforms (ToTensor, Normalize)
on a Dataset of PIL images, a DataLoader, a ViT built from nn.TransformerEncoder, Adam 1e-3 and a
per-epoch cosine, with a loss.item() per step for its running loss.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError

# A typical tutorial ViT for 28x28 digits: patch 4, dim 64, depth 6, 4 heads, MLP 2x.
TUTORIAL_DIMS = {"patch_size": 4, "dim": 64, "depth": 6, "heads": 4, "mlp_ratio": 2.0, "dropout": 0.0}


def baseline_dims(cfg, which):
    """The baseline ViT's keys: the config's model, or the tutorial dims at the config's image size."""
    m = cfg.model
    dims = {"image_size": m.image_size, "patch_size": m.patch_size, "dim": m.dim, "depth": m.depth,
            "heads": m.heads, "mlp_ratio": m.mlp_ratio, "dropout": m.dropout}
    if which == "tutorial":
        dims.update(TUTORIAL_DIMS)
        if m.image_size % TUTORIAL_DIMS["patch_size"]:
            raise UserError(f"--baseline-dims tutorial uses patch 4, which does not divide model.image_size="
                            f"{m.image_size}; use a multiple of 4 or --baseline-dims config")
    return dims


class PILDataset(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST's behaviour: one PIL image per item, through `transform`."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.numpy(), labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        img = self.images[i]  # (C, H, W) uint8
        pil = Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
        return self.transform(pil), self.labels[i]


class TutorialViT(nn.Module):
    """The usual tutorial ViT: Conv2d patches, a CLS token, learned positions, nn.TransformerEncoder."""

    def __init__(self, dims, in_channels, num_classes):
        super().__init__()
        n, dim = (dims["image_size"] // dims["patch_size"]) ** 2, dims["dim"]
        self.patch = nn.Conv2d(in_channels, dim, kernel_size=dims["patch_size"], stride=dims["patch_size"])
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, dims["heads"], int(dim * dims["mlp_ratio"]), dims["dropout"],
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, dims["depth"], enable_nested_tensor=False)  # pre-norm cannot nest
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos  # (B, N+1, D)
        return self.head(self.norm(self.encoder(x))[:, 0])


def baseline_loaders(cfg, args, info, tensors):
    """DataLoaders over PIL images with per-sample ToTensor/Normalize; tensors = (tx, ty, vx, vy)."""
    from torchvision import transforms

    tx, ty, vx, vy = tensors
    steps = [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    if cfg.model.image_size != tx.shape[-1]:
        steps.insert(0, transforms.Resize(cfg.model.image_size))
    tf = transforms.Compose(steps)
    g = torch.Generator().manual_seed(cfg.train.seed)
    train_loader = torch.utils.data.DataLoader(PILDataset(tx, ty, tf), batch_size=args.baseline_batch, shuffle=True,
                                               num_workers=args.baseline_workers, generator=g)
    test_loader = torch.utils.data.DataLoader(PILDataset(vx, vy, tf), batch_size=cfg.train.eval_batch_size,
                                              shuffle=False, num_workers=args.baseline_workers)
    return train_loader, test_loader


@dataclass
class Baseline:
    """The baseline's set-up: what its training and evaluation need."""
    cfg: object
    dims: dict
    info: object
    device: torch.device
    epochs: int
    loaders: tuple

    def build(self):
        """Model and optimizer: Adam 1e-3, cosine over `epochs` stepped once per epoch."""
        torch.manual_seed(self.cfg.train.seed)
        model = TutorialViT(self.dims, self.info.in_channels, len(self.info.classes)).to(self.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        return model, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)


def baseline_step(model, optimizer, batch, device, tally):
    x, y = batch[0].to(device), batch[1].to(device)
    optimizer.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    optimizer.step()
    tally[0] += loss.item() * y.numel()  # a running loss and accuracy, as tutorials log them: a host sync per step
    tally[1] += (out.argmax(1) == y).sum().item()


def baseline_stepper(parts, loader, device):
    """step_fn(n): n more baseline steps, a new shuffled epoch (and scheduler step) when one ends."""
    model, optimizer, scheduler = parts
    it, tally = [iter(loader)], [0.0, 0]
    model.train()

    def step_fn(n):
        for _ in range(n):
            batch = next(it[0], None)
            if batch is None:
                scheduler.step()
                it[0] = iter(loader)
                batch = next(it[0])
            baseline_step(model, optimizer, batch, device, tally)
    return step_fn


@torch.no_grad()
def baseline_eval(model, loader, device, limit=0):
    model.eval()
    correct = n = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(1) == y).sum().item()
        n += y.numel()
        if limit and n >= limit:
            break
    model.train()
    return correct / max(n, 1), n


def baseline_time_to_acc(base, clock, target, cap):
    """The baseline's loop from scratch, epoch by epoch, until test accuracy >= target; eval off the clock."""
    (train_loader, test_loader), (model, optimizer, scheduler) = base.loaders, base.build()
    spent, acc, curve, tally = 0.0, 0.0, [], [0.0, 0]
    for _ in range(base.epochs):
        t0, capped = clock.now(), False
        for batch in train_loader:
            baseline_step(model, optimizer, batch, base.device, tally)
            if cap and spent + time.perf_counter() - t0 >= cap:
                capped = True
                break
        scheduler.step()
        spent += clock.now() - t0
        acc = baseline_eval(model, test_loader, base.device)[0]
        curve.append([round(spent, 2), round(acc, 4)])
        if acc >= target or capped:
            break
    return spent, acc, curve


def baseline_summary(args, dims, dataset, n_train):
    return {"dataset": dataset, "model": f"nn.TransformerEncoder (batch_first, norm_first), "
            f"{args.baseline_dims} dims", "image_size": dims["image_size"], "patch": dims["patch_size"],
            "dim": dims["dim"], "depth": dims["depth"], "heads": dims["heads"], "mlp_ratio": dims["mlp_ratio"],
            "batch": args.baseline_batch, "optimizer": "adam", "lr": 1e-3,
            "epochs": args.baseline_epochs, "scheduler": "cosine per epoch", "amp": "off", "compile": False,
            "augment": False, "loader": f"DataLoader(num_workers={args.baseline_workers}) + ToTensor/Normalize",
            "train_images": n_train}
