import pytest
import torch

from model import ViT, build_model, strip_prefixes

ARGS = {"name": "vit", "image_size": 28, "patch_size": 7, "in_channels": 1, "num_classes": 10, "dim": 32,
        "depth": 2, "heads": 4, "mlp_ratio": 2.0, "dropout": 0.0, "drop_path": 0.1, "pool": "cls"}


@pytest.mark.parametrize("name, pool", [("vit", "cls"), ("vit", "mean"), ("torchvision_vit", "cls")])
def test_forward_shape_and_backward(name, pool):
    torch.manual_seed(0)
    model = build_model(dict(ARGS, name=name, pool=pool, in_channels=3, image_size=32, patch_size=8))
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
