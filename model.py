"""The networks: a patch-embedding Vision Transformer (optionally behind a small conv stem),
torchvision's ViT built from the same keys, a CIFAR-style ResNet, and an EMA of the weights.

`build_model(model_args)` is the one entry point. `model_args` is a plain dict that every
checkpoint carries, so infer.py and `train.py --eval` rebuild the model from a checkpoint alone.
This file imports nothing else of the project.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_NAMES = ("vit", "torchvision_vit", "resnet")


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with one non-overlapping patch per token."""

    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class ConvStem(nn.Module):
    """A small convolutional tokenizer (model.stem: conv): two 3x3 conv + BatchNorm + ReLU layers
    at full resolution, then the same patch_size grid as PatchEmbed, so the token count and the
    position embedding do not change. Early convolutions give the tokens local edge features
    (Xiao et al. 2021, "Early convolutions help transformers see better")."""

    def __init__(self, in_channels, dim, patch_size, width=32):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.proj = nn.Conv2d(width, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(self.convs(x)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: one fused QKV projection, then SDPA."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D/H)
        p = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # CPU SDPA's bf16 backward runs about 3x slower than fp32 (torch 2.14); two batched matmuls
            # use the CPU's bf16 matrix units instead, with the softmax in fp32.
            a = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            a = F.dropout(a.float().softmax(-1), p, self.training).to(v.dtype)
            x = a @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class MLP(nn.Module):
    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, heads, mlp_ratio, dropout, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    def __init__(self, image_size=28, patch_size=7, in_channels=1, num_classes=10, dim=64, depth=6,
                 heads=4, mlp_ratio=2.0, dropout=0.0, drop_path=0.0, pool="cls", stem="patch"):
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("num_classes", num_classes), ("dim", dim), ("depth", depth), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ViT: {name} must be a positive integer, got {value!r}")
        if image_size % patch_size:
            raise ValueError(f"ViT: image_size {image_size} is not divisible by patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"ViT: dim {dim} is not divisible by heads {heads}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"ViT: pool must be 'cls' or 'mean', got {pool!r}")
        if stem not in ("patch", "conv"):
            raise ValueError(f"ViT: stem must be 'patch' or 'conv', got {stem!r}")
        if not 0.0 <= dropout < 1.0 or not 0.0 <= drop_path < 1.0:
            raise ValueError("ViT: dropout and drop_path must be in [0, 1)")
        self.pool = pool
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = (ConvStem if stem == "conv" else PatchEmbed)(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()  # deeper blocks are dropped more often
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout, r) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self):
        # Position codes of unit scale make every token position-distinguishable from the first
        # step; with timm's std 0.02 a small ViT first spends hundreds of steps learning where its
        # patches are (1 epoch of 20k MNIST images: 72% -> 95% val_acc here). Xavier suits the
        # narrow widths used here better than std 0.02, which is sized for dim 768.
        nn.init.normal_(self.pos_embed, std=1.0)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)  # (B, N+1, D)
        x = self.norm(self.blocks(x))
        x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.head(x)  # (B, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    """ResNet-18 in its CIFAR form (He et al. 2016): a 3x3 stem without max-pool, then four stages
    of `blocks` BasicBlocks at widths width, 2x, 4x, 8x (strides 1, 2, 2, 2), global average pool
    and a linear head. model.dim is the width (64 = ResNet-18), model.depth the blocks per stage."""

    def __init__(self, in_channels=3, num_classes=10, width=64, blocks=2, dropout=0.0):
        super().__init__()
        if width < 1 or blocks < 1:
            raise ValueError("ResNet: width (model.dim) and blocks (model.depth) must be >= 1")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            for j in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.layers:  # each residual branch starts as identity (Goyal et al. 2017)
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def build_torchvision_vit(image_size, patch_size, in_channels, num_classes, dim, depth, heads, mlp_ratio,
                          dropout, **_ignored):
    """torchvision's VisionTransformer from our keys. It hard-codes 3 input channels, so the
    patch projection is swapped for one that takes `in_channels`."""
    from torchvision.models.vision_transformer import VisionTransformer

    if image_size % patch_size:
        raise ValueError(f"torchvision_vit: image_size {image_size} is not divisible by patch_size {patch_size}")
    if dim % heads:
        raise ValueError(f"torchvision_vit: dim {dim} is not divisible by heads {heads}")
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=depth, num_heads=heads,
                              hidden_dim=dim, mlp_dim=int(dim * mlp_ratio), dropout=dropout,
                              attention_dropout=dropout, num_classes=num_classes)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
    return model


def model_args_from_config(mcfg, in_channels, num_classes):
    """The plain dict a checkpoint stores; build_model() takes it back."""
    return {"name": mcfg.name, "image_size": int(mcfg.image_size), "patch_size": int(mcfg.patch_size),
            "in_channels": int(in_channels), "num_classes": int(num_classes), "dim": int(mcfg.dim),
            "depth": int(mcfg.depth), "heads": int(mcfg.heads), "mlp_ratio": float(mcfg.mlp_ratio),
            "dropout": float(mcfg.dropout), "drop_path": float(mcfg.drop_path), "pool": str(mcfg.pool),
            "stem": str(mcfg.stem)}


def build_model(model_args):
    args = dict(model_args)
    name = args.pop("name", "vit")
    if name == "vit":
        return ViT(**args)
    if name == "torchvision_vit":
        return build_torchvision_vit(**args)
    if name == "resnet":
        return ResNet(args["in_channels"], args["num_classes"], args["dim"], args["depth"], args.get("dropout", 0.0))
    raise ValueError(f"unknown model.name {name!r}; allowed: {', '.join(MODEL_NAMES)}")


def strip_prefixes(state_dict):
    """Undo the wrappers' renaming: DDP adds `module.`, torch.compile adds `_orig_mod.`."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


class ModelEMA:
    """Exponential moving average of a model's weights, updated after every optimizer step.

    `module` is a frozen copy that holds the averages (float parameters and buffers; integer
    buffers are copied). With warmup the decay starts low, min(decay, (1 + n) / (10 + n)) at
    update n, so the average is not dominated by the random initial weights. Every DDP rank
    sees the same weights and so keeps the same average: no communication."""

    def __init__(self, model, decay, warmup=True):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._avg = [a for a, _ in pairs if a.is_floating_point()]  # averaged ...
        self._src = [b for a, b in pairs if a.is_floating_point()]  # ... from these live tensors
        self._copied = [(a, b) for a, b in pairs if not a.is_floating_point()]  # e.g. num_batches_tracked

    def current_decay(self):
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self):
        d = self.current_decay()
        self.updates += 1
        if self._avg:
            torch._foreach_lerp_(self._avg, self._src, 1.0 - d)
        for a, b in self._copied:
            a.copy_(b)

    @torch.no_grad()
    def restart(self):
        """Start the average over from the model's current weights (EMA switched on mid-run)."""
        for a, b in list(zip(self._avg, self._src)) + self._copied:
            a.copy_(b)
        self.updates = 0

    def state_dict(self):
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(strip_prefixes(state["model"]))
        self.updates = int(state["updates"])


def preferred_weights(ckpt):
    """(state_dict, label): the EMA weights when the checkpoint has them, else the raw ones."""
    if ckpt.get("ema_model") is not None:
        return strip_prefixes(ckpt["ema_model"]), "EMA"
    if isinstance(ckpt.get("ema"), dict) and ckpt["ema"].get("model") is not None:  # a training checkpoint's EMA
        return strip_prefixes(ckpt["ema"]["model"]), "EMA"
    return strip_prefixes(ckpt["model"]), "raw"


# --------------------------------------------------------------------------- starting from weights

HEAD_KEYS = ("head.weight", "head.bias", "heads.head.weight", "heads.head.bias")  # reset for a new class count
POS_KEYS = ("pos_embed", "encoder.pos_embedding")  # (1, 1 + grid cells, D): CLS first, then the patch grid


def resize_pos_embed(pe, cells):
    """(1, 1 + h*h, D) -> (1, 1 + cells, D): the CLS position kept, the square grid resized bicubically."""
    src, dst = round(math.sqrt(pe.shape[1] - 1)), round(math.sqrt(cells))
    grid = pe[:, 1:].reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, D, h, h)
    grid = F.interpolate(grid.float(), size=(dst, dst), mode="bicubic", align_corners=False).to(pe.dtype)
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, dst * dst, -1)], dim=1)


def adapt_input_conv(w, channels):
    """An input convolution (D, C, k, k) for another channel count: grey to colour repeats the kernel
    and divides it by the new count (a grey image copied to every channel gives the same output);
    colour to grey sums the kernels (a grey image seen as R = G = B)."""
    if w.shape[1] == 1:
        return w.repeat(1, channels, 1, 1) / channels
    if channels == 1:
        return w.sum(1, keepdim=True)
    raise ValueError(f"cannot adapt {w.shape[1]} input channels to {channels}")


def transfer_weights(src, model):
    """The state dict of `model` filled from `src` (another model's state dict) wherever they
    agree, and adapted where they may differ: the classifier head is reset when the class count
    differs, the position embedding resized to the new patch grid, the input convolution adapted
    to the new channel count. Returns (state dict, notes); raises ValueError naming both shapes for
    a difference it cannot adapt (another width, depth or patch size)."""
    dst, notes = model.state_dict(), {"loaded": 0, "reset": [], "resized": [], "adapted": []}
    missing = sorted(set(dst) - set(src) - set(HEAD_KEYS))
    if missing or set(src) - set(dst):
        raise ValueError(f"the two models differ in their layers ({(missing or sorted(set(src) - set(dst)))[0]} is "
                         f"only in {'this one' if missing else 'that one'}): another depth or model")
    out = {}
    for key, want in dst.items():
        have = src.get(key)
        if have is not None and have.shape == want.shape:
            out[key], notes["loaded"] = have.to(want.dtype), notes["loaded"] + 1
        elif key in HEAD_KEYS:
            out[key] = want
            notes["reset"].append(key)
        elif key in POS_KEYS and have.shape[2] == want.shape[2]:
            out[key] = resize_pos_embed(have, want.shape[1] - 1)
            notes["resized"].append(f"{key} ({have.shape[1] - 1} -> {want.shape[1] - 1} patches)")
        elif have.dim() == 4 and have.shape[0] == want.shape[0] and have.shape[2:] == want.shape[2:]:
            out[key] = adapt_input_conv(have, want.shape[1]).to(want.dtype)
            notes["adapted"].append(f"{key} ({have.shape[1]} -> {want.shape[1]} channels)")
        else:
            raise ValueError(f"{key} is {tuple(have.shape)} there and {tuple(want.shape)} here")
    return out, notes
