"""Whole-batch training augmentation of uint8 images on the device: shift and crop, rotation and
zoom, flips, TrivialAugment, random erasing, mixup and cutmix. Each is a few batched tensor
operations, never a loop over images in Python. The random numbers of a step come from a generator
seeded with (seed, epoch, step) and are drawn for the whole global batch, so a resumed run draws
what the uninterrupted run drew and every rank's slice matches the global batch.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from data import to_device


def random_shift(x, pad, offsets):
    """Shift each image by its own offset (dy, dx) in [0, 2*pad] of the zero-padded image: a
    random crop of the whole batch with two gathers and no Python loop. uint8 in, uint8 out."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    off = to_device(offsets, x.device)
    rows = (off[0].view(B, 1) + torch.arange(H, device=x.device)).view(B, 1, H, 1)
    padded = padded.gather(2, rows.expand(B, C, H, W + 2 * pad))  # (B, C, H, W+2p)
    cols = (off[1].view(B, 1) + torch.arange(W, device=x.device)).view(B, 1, 1, W)
    return padded.gather(3, cols.expand(B, C, H, W))


def random_affine(x, degrees, scale, gen, lo, total):
    """Rotate by up to +-degrees and scale by 1+-scale, each image its own draw, with one
    affine_grid/grid_sample for the whole batch; the background outside fills with 0 (black, as
    the digit sets). uint8 in, uint8 out."""
    B = x.shape[0]
    angle = (torch.rand(total, generator=gen)[lo:lo + B] * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(total, generator=gen)[lo:lo + B] * 2 - 1) * scale
    cos, sin, zero = torch.cos(angle) / zoom, torch.sin(angle) / zoom, torch.zeros(B)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(to_device(theta, x.device), list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


TRIVIAL_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
               "contrast", "sharpness", "posterize", "solarize", "autocontrast")
_OP = {n: i for i, n in enumerate(TRIVIAL_OPS)}


def _blend(a, b, factor):
    """PIL's ImageEnhance: b + factor * (a - b), per image factor (B,), clamped to [0, 1]."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


def _gray(x):
    return x if x.shape[1] == 1 else (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _affine_params(op, m):
    """(B, 2, 3) affine matrices of the geometric ops (identity elsewhere), strengths m in [-1, 1]."""
    theta = torch.zeros(len(op), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    for name, row, col, scale in (("shear_x", 0, 1, 0.3), ("shear_y", 1, 0, 0.3),
                                  ("translate_x", 0, 2, 0.9), ("translate_y", 1, 2, 0.9)):  # 0.9: 0.45 of the side
        sel = op == _OP[name]
        theta[sel, row, col] = scale * m[sel]
    sel = op == _OP["rotate"]
    a = torch.deg2rad(30.0 * m[sel])
    theta[sel, 0, 0], theta[sel, 0, 1], theta[sel, 1, 0], theta[sel, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    return theta


def _colour_op(name, v, f, mag):
    """One colour op on the float images v (n, C, H, W) that drew it; f = 1 + 0.9 m, mag = |m| (device)."""
    if name == "brightness":
        return _blend(v, torch.zeros_like(v), f)
    if name == "color":
        return _blend(v, _gray(v).expand_as(v), f)
    if name == "contrast":
        return _blend(v, _gray(v).mean(dim=(1, 2, 3), keepdim=True).expand_as(v), f)
    if name == "sharpness":
        C = v.shape[1]
        k = to_device(torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0, v.device)
        smooth = F.conv2d(F.pad(v, (1, 1, 1, 1), mode="replicate"), k.expand(C, 1, 3, 3).contiguous(), groups=C)
        return _blend(v, smooth, f)
    if name == "posterize":
        step = 2.0 ** (mag * 4).floor().view(-1, 1, 1, 1)  # keep 8..4 bits
        return ((v * 255).round() / step).floor() * step / 255
    if name == "solarize":
        return torch.where(v >= (1.0 - mag).view(-1, 1, 1, 1), 1.0 - v, v)
    low, high = v.amin(dim=(2, 3), keepdim=True), v.amax(dim=(2, 3), keepdim=True)  # autocontrast
    return torch.where(high > low, (v - low) / (high - low).clamp_min(1e-6), v)


def trivial_augment(x, gen, lo, total):
    """TrivialAugment (Müller & Hutter 2021): each image gets one op, drawn uniformly from
    TRIVIAL_OPS, at a uniform random strength (RandAugment's ranges; equalize is left out). The
    geometric ops of the whole batch are one affine_grid/grid_sample; each colour op runs once on
    the images that drew it. No per-image Python. uint8 in, uint8 out."""
    B, C, H, W = x.shape
    op = torch.randint(0, len(TRIVIAL_OPS), (total,), generator=gen)[lo:lo + B]
    mag = torch.rand(total, generator=gen)[lo:lo + B]
    m = mag * torch.where(torch.rand(total, generator=gen)[lo:lo + B] < 0.5, -1.0, 1.0)
    dev, y = x.device, x.float().div_(255.0)
    geometric = (op >= _OP["shear_x"]) & (op <= _OP["rotate"])
    if geometric.any():
        idx = to_device(geometric.nonzero().squeeze(1), dev)
        grid = F.affine_grid(to_device(_affine_params(op, m)[geometric], dev), [len(idx), C, H, W],
                             align_corners=False)
        y[idx] = F.grid_sample(y[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    for name in TRIVIAL_OPS[_OP["brightness"]:]:
        sel = op == _OP[name]  # on the CPU: no device sync to find out which images drew the op
        if sel.any():
            idx = to_device(sel.nonzero().squeeze(1), dev)
            y[idx] = _colour_op(name, y[idx], to_device(1.0 + 0.9 * m[sel], dev), to_device(mag[sel], dev))
    return y.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def erasing_noise(shape, gen, device):
    """Uniform uint8 noise for the whole global batch of `shape`, from the batch's generator `gen`.
    CUDA and MPS draw it on the device, from a generator seeded by one draw of `gen` (the same on every
    rank, so a rank's rows are still the global batch's): building it on the host would cost every
    rank the whole batch's noise and a copy each step. Elsewhere `gen` draws it, as on the CPU."""
    if device.type in ("cuda", "mps"):
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        on_device = torch.Generator(device=device).manual_seed(seed)
        return torch.randint(0, 256, shape, generator=on_device, dtype=torch.uint8, device=device)
    return to_device(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8), device)


def random_erasing(x, p, gen, lo, total):
    """Random erasing (Zhong et al. 2017): with probability p per image, one rectangle of 2-33%
    of the area and aspect ratio 0.3-3.3 is filled with uniform noise. One mask for the batch,
    built on the device from the rectangles' corners. uint8 in, uint8 out."""
    B, C, H, W = x.shape
    draws = torch.rand(5, total, generator=gen)[:, lo:lo + B]
    noise = erasing_noise((total, C, H, W), gen, x.device)[lo:lo + B]
    area = (0.02 + draws[0] * (1 / 3 - 0.02)) * H * W
    ratio = torch.exp(math.log(0.3) + draws[1] * (math.log(1 / 0.3) - math.log(0.3)))
    h = (area * ratio).sqrt().round().clamp(1, H)
    w = (area / ratio).sqrt().round().clamp(1, W)
    top = (draws[2] * (H - h + 1)).floor()
    left = (draws[3] * (W - w + 1)).floor()
    corners = to_device(torch.stack([top, top + h, left, left + w, (draws[4] < p).float()]), x.device)
    t0, t1, l0, l1, on = corners.view(5, B, 1, 1).unbind(0)
    rows, cols = torch.arange(H, device=x.device).view(1, H, 1), torch.arange(W, device=x.device).view(1, 1, W)
    box = (rows >= t0) & (rows < t1) & (cols >= l0) & (cols < l1) & (on > 0)
    return torch.where(box.unsqueeze(1), noise, x)


def mix_batch(x, gen, mixup_alpha, cutmix_alpha):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a normalised float batch with
    itself reversed: one Beta(alpha, alpha) draw per batch, and with both on, either one with
    probability 1/2 (as timm). Returns (mixed x, lam): the loss is lam * CE(y) + (1 - lam) * CE(y
    reversed). lam is the exact kept-area fraction for CutMix."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(*(2 * [cutmix_alpha if use_cutmix else mixup_alpha])))
    other = x.flip(0)
    if not use_cutmix:
        return x.mul(lam).add_(other, alpha=1 - lam), lam
    H, W = x.shape[-2:]
    cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
    return x, 1.0 - (y1 - y0) * (x1 - x0) / (H * W)




def augment(x, gen, dcfg, info, rows=None):
    """Whole-batch training augmentation of uint8 images, as data.* and the data set (`info`:
    digit_style, hflip) ask for it.

    The random numbers are drawn on a CPU generator for the whole global batch of `total`
    images and this rank takes rows lo:lo+len(x) (rows = (lo, total); default: the whole batch),
    so the result does not depend on the device or on how the global batch is split across ranks."""
    if not dcfg.augment:
        return x
    B = x.shape[0]
    lo, total = rows or (0, B)
    if info.digit_style and (dcfg.rotate or dcfg.scale):
        x = random_affine(x, dcfg.rotate, dcfg.scale, gen, lo, total)
    pad = dcfg.translate if info.digit_style else dcfg.crop_padding
    if pad:
        x = random_shift(x, pad, torch.randint(0, 2 * pad + 1, (2, total), generator=gen)[:, lo:lo + B])
    if dcfg.hflip and info.hflip:
        flip = to_device((torch.rand(total, generator=gen) < 0.5)[lo:lo + B], x.device).view(B, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    if dcfg.trivial_augment:
        x = trivial_augment(x, gen, lo, total)
    if dcfg.random_erasing > 0:
        x = random_erasing(x, dcfg.random_erasing, gen, lo, total)
    return x


def batch_generator(seed, epoch, step):
    """The augmentation RNG of one global batch, derived from (seed, epoch, step) alone, so a
    run resumed mid-epoch draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 100_003 + step) % (2**63))
