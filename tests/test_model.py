import pytest
import torch

from model import ModelEMA, ViT, build_model, preferred_weights, strip_prefixes

ARGS = {"name": "vit", "image_size": 28, "patch_size": 7, "in_channels": 1, "num_classes": 10, "dim": 32,
        "depth": 2, "heads": 4, "mlp_ratio": 2.0, "dropout": 0.0, "drop_path": 0.1, "pool": "cls"}


@pytest.mark.parametrize("name, pool, stem", [("vit", "cls", "patch"), ("vit", "mean", "patch"), ("vit", "cls", "conv"),
                                             ("torchvision_vit", "cls", "patch"), ("resnet", "cls", "patch")])
def test_forward_shape_and_backward(name, pool, stem):
    torch.manual_seed(0)
    model = build_model(dict(ARGS, name=name, pool=pool, stem=stem, in_channels=3, image_size=32, patch_size=8))
    x = torch.randn(5, 3, 32, 32)
    out = model(x)
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kw, words", [
    ({"patch_size": 5}, "not divisible by patch_size 5"),
    ({"dim": 30}, "dim 30 is not divisible by heads 4"),
    ({"pool": "max"}, "pool"),
    ({"depth": 0}, "depth"),
    ({"stem": "resnet"}, "stem"),
])
def test_constructor_checks_arguments(kw, words):
    args = {k: v for k, v in ARGS.items() if k != "name"}
    args.update(kw)
    with pytest.raises(ValueError, match=words):
        ViT(**args)


def test_eval_is_deterministic_and_drop_path_only_in_training():
    torch.manual_seed(0)
    model = build_model(ARGS).eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))


def test_strip_prefixes_from_ddp_and_compile():
    sd = {"module._orig_mod.head.weight": torch.ones(1), "_orig_mod.module.norm.bias": torch.zeros(1), "head.bias": 1}
    assert set(strip_prefixes(sd)) == {"head.weight", "norm.bias", "head.bias"}


def test_conv_stem_keeps_the_token_grid():
    torch.manual_seed(0)
    patch, conv = build_model(ARGS), build_model(dict(ARGS, stem="conv"))
    assert patch.pos_embed.shape == conv.pos_embed.shape == (1, 17, 32)  # (28/7)^2 patches + CLS
    assert conv.patch_embed(torch.randn(2, 1, 28, 28)).shape == (2, 16, 32)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in conv.modules())


def test_ema_follows_the_weights_with_warmup_and_copies_integer_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(net, decay=0.9, warmup=True)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(8, 3))  # BN: running stats and num_batches_tracked move
    d0 = ema.current_decay()
    assert d0 == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early updates follow the weights closely
    ema.update()
    assert torch.allclose(ema.module[0].weight, start * d0 + net[0].weight * (1 - d0))
    assert int(ema.module[1].num_batches_tracked) == 1
    assert not any(p.requires_grad for p in ema.module.parameters())
    for _ in range(200):
        ema.update()
    assert ema.current_decay() == 0.9 and torch.allclose(ema.module[0].weight, net[0].weight, atol=1e-6)
    again = ModelEMA(net, decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 201 and torch.equal(again.module[0].weight, ema.module[0].weight)
    plain = ModelEMA(net, decay=0.9, warmup=False)
    assert plain.current_decay() == 0.9
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    plain.restart()  # train.ema switched on when resuming a run that had none
    assert plain.updates == 0 and torch.equal(plain.module[0].weight, net[0].weight)


def test_preferred_weights_are_the_ema_ones():
    raw, avg = {"w": torch.zeros(1)}, {"module.w": torch.ones(1)}
    assert preferred_weights({"model": raw})[1] == "raw"
    weights, kind = preferred_weights({"model": raw, "ema_model": avg})
    assert kind == "EMA" and torch.equal(weights["w"], torch.ones(1))


def test_resnet18_shape_and_size():
    model = build_model(dict(ARGS, name="resnet", in_channels=3, dim=64, depth=2, image_size=32))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)  # ResNet-18 (CIFAR)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    small = build_model(dict(ARGS, name="resnet", dim=8, depth=1))  # 1-channel 28x28 digits too
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bf16_cpu_attention_matches_sdpa():
    # under CPU bf16 autocast the attention runs as two matmuls (SDPA's bf16 backward is slow there);
    # its output and gradients must match SDPA's on the same bf16 inputs
    from model import Attention
    torch.manual_seed(0)
    att = Attention(32, 4)
    x = torch.randn(3, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = att(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grad = att.qkv.weight.grad.clone()
    att.zero_grad()
    qkv = att.qkv(x).bfloat16().view(3, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(*qkv.unbind(0)).float()
    ref = att.proj(ref.transpose(1, 2).reshape(3, 10, 32))
    ref.square().sum().backward()
    assert torch.allclose(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert torch.allclose(grad, att.qkv.weight.grad, atol=5e-2, rtol=5e-2)
