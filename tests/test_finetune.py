"""model.init_from: every matching tensor is loaded, and the classifier head, the position
embedding and the input channels are adapted; anything else that differs is a one-line error."""
import os

import pytest
import torch
from PIL import Image

import train
from checkpoint import init_weights
from conftest import RUN, TINY_VIT, read_metrics, small_run_args, tiny_weights_file
from model import build_model, transfer_weights
from utils import UserError


def built(**changes):
    torch.manual_seed(1)
    return build_model(dict(TINY_VIT, **changes)).eval()


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_grey_to_colour_and_back_gives_the_same_logits_on_grey_images(stem):
    grey = built(stem=stem)
    colour = built(stem=stem, in_channels=3)
    state, notes = transfer_weights(grey.state_dict(), colour)
    colour.load_state_dict(state)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(colour(x.expand(-1, 3, -1, -1)), grey(x), atol=1e-5)
    assert notes["adapted"] and "1 -> 3 channels" in notes["adapted"][0] and not notes["reset"]
    back = built(stem=stem)
    back.load_state_dict(transfer_weights(colour.state_dict(), back)[0])
    assert torch.allclose(back(x), grey(x), atol=1e-5)


def test_a_new_class_count_resets_only_the_head():
    src, dst = built(), built(num_classes=5)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    state, notes = transfer_weights(src.state_dict(), dst)
    assert notes["reset"] == ["head.weight", "head.bias"] and notes["loaded"] == len(state) - 2
    assert torch.equal(state["head.weight"], fresh["head.weight"])
    assert torch.equal(state["blocks.1.mlp.fc2.weight"], src.state_dict()["blocks.1.mlp.fc2.weight"])


def test_another_image_size_resizes_the_position_grid():
    src, dst = built(), built(image_size=56)  # 4x4 patches of 7 -> 8x8
    state, notes = transfer_weights(src.state_dict(), dst)
    assert state["pos_embed"].shape == (1, 65, 32) and notes["resized"] == ["pos_embed (16 -> 64 patches)"]
    assert torch.equal(state["pos_embed"][:, 0], src.pos_embed[:, 0])  # the CLS position is kept
    dst.load_state_dict(state)
    grid = dst.pos_embed[0, 1:].reshape(8, 8, 32)
    assert torch.allclose(grid.mean((0, 1)), src.pos_embed[0, 1:].mean(0), atol=0.1)  # the same codes, finer


@pytest.mark.parametrize("changes, words", [
    ({"dim": 64, "heads": 2}, "cls_token is (1, 1, 32) there and (1, 1, 64) here"),
    ({"depth": 3}, "only in this one"),
    ({"patch_size": 4}, "patch_embed.proj.weight is (32, 1, 7, 7) there")])
def test_a_difference_it_cannot_adapt_names_both_shapes(changes, words, tmp_path):
    with pytest.raises(ValueError) as e:
        transfer_weights(built().state_dict(), built(**changes))
    assert words in str(e.value), str(e.value)
    path = str(tmp_path / "w.pth")
    tiny_weights_file(path)
    with pytest.raises(UserError) as e:
        init_weights(built(**changes), path)
    assert str(e.value).startswith(f"model.init_from={path}:") and "keep model.dim" in str(e.value)


class StopAtSixthCheck(train.StopSignal):
    """As if SIGTERM arrived before the sixth stop check (one per step, one at each epoch's end)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def agreed(self, device, world):
        self.calls += 1
        return self.calls >= 6


def grey_folder(root, classes=5, per_class=16):
    """Grey 28x28 images of 5 classes: a bright bar at a class-specific height."""
    torch.manual_seed(0)
    for split, n in (("train", per_class), ("test", 6)):
        for k in range(classes):
            os.makedirs(os.path.join(root, split, str(k)))
            for i in range(n):
                a = (torch.rand(28, 28) * 60).to(torch.uint8)
                a[4 + 4 * k: 7 + 4 * k, 4:24] = 255
                Image.fromarray(a.numpy()).save(os.path.join(root, split, str(k), f"{i}.png"))


@pytest.mark.slow
def test_fine_tune_of_another_data_set_image_size_and_channels_then_resume(tmp_path, mnist_root, monkeypatch):
    assert train.main(small_run_args(tmp_path / "src", mnist_root, "train.epochs=1")) == 0
    source = str(tmp_path / "src" / "ckpt" / RUN)
    grey_folder(str(tmp_path / "folder"))
    args = small_run_args(tmp_path / "ft", tmp_path / "folder", "data.dataset=folder", "data.channels=3",
                          "model.image_size=56", "train.batch_size=16", "train.epochs=2", f"model.init_from={source}",
                          "train.ema=true", "train.ema_decay=0.9")
    monkeypatch.setattr(train, "StopSignal", StopAtSixthCheck)  # 80 images / 16 = 5 steps: stops after epoch 1
    assert train.main(args) == 0
    log = (tmp_path / "ft" / "logs" / RUN / "train.log").read_text()
    assert "model.init_from" in log and "reset head.weight, head.bias" in log
    assert "pos_embed (16 -> 64 patches)" in log and "(1 -> 3 channels)" in log
    monkeypatch.undo()
    assert train.main(args + ["checkpoint.resume=true"]) == 0
    log = (tmp_path / "ft" / "logs" / RUN / "train.log").read_text()
    assert log.count("model.init_from") == 1 and "resumed from" in log  # a resumed fine-tune does not re-load
    assert [r["epoch"] for r in read_metrics(tmp_path / "ft" / "logs" / RUN)] == [1, 2]


def test_min_steps_raises_the_epochs_of_a_small_set(tmp_path):
    import logging

    from utils import load_config
    cfg = load_config(None, ["train.epochs=3", "train.min_steps=100"])
    assert train.enough_epochs(cfg, 31, logging.getLogger("t")).train.epochs == 4  # ceil(100 / 31)
    assert train.enough_epochs(cfg, 40, logging.getLogger("t")) is cfg  # 3 epochs of 40 steps are enough
    with pytest.raises(Exception, match="read-only"):
        train.enough_epochs(cfg, 31, logging.getLogger("t")).train.epochs = 1
