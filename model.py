"""The network: a patch-embedding Vision Transformer, and torchvision's ViT built from the same keys.

`build_model(model_args)` is the one entry point. `model_args` is a plain dict that every
checkpoint carries, so infer.py and `train.py --eval` rebuild the model from a checkpoint alone.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_NAMES = ("vit", "torchvision_vit")


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with one non-overlapping patch per token."""

    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


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
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
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
                 heads=4, mlp_ratio=2.0, dropout=0.0, drop_path=0.0, pool="cls"):
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
        if not 0.0 <= dropout < 1.0 or not 0.0 <= drop_path < 1.0:
            raise ValueError("ViT: dropout and drop_path must be in [0, 1)")
        self.pool = pool
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = torch.linspace(0, drop_path, depth).tolist()  # deeper blocks are dropped more often
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
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)  # (B, N+1, D)
        x = self.norm(self.blocks(x))
        x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.head(x)  # (B, num_classes)


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
            "dropout": float(mcfg.dropout), "drop_path": float(mcfg.drop_path), "pool": str(mcfg.pool)}


def build_model(model_args):
    args = dict(model_args)
    name = args.pop("name", "vit")
    if name == "vit":
        return ViT(**args)
    if name == "torchvision_vit":
        return build_torchvision_vit(**args)
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


def final_weights_name(dataset, model_name):
    """`mnist_transformer_final.pth` for the default ViT (the seed's name)."""
    tag = "transformer" if model_name == "vit" else model_name
    return f"{dataset}_{tag}_final.pth"
