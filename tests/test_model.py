"""Network factory and the shared inference helper."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from divaware.model import (
    MODELS,
    build_model,
    infer,
    network_divisor,
    pad_to_divisor,
    probabilities,
    segment,
)

TINY = {"channels": (8, 8, 16, 16, 16), "strides": (2, 2), "num_res_units": 1}
SMALL = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 2, "dropout": 0.0}


def _tiny(name: str) -> torch.nn.Module:
    channels = TINY["channels"] if name == "basicunet" else TINY["channels"][:3]
    return build_model(name, in_channels=3, out_channels=2, channels=channels, strides=TINY["strides"],
                       num_res_units=TINY["num_res_units"], dropout=0.0).eval()


def test_default_is_the_published_unet() -> None:
    from divaware.config import TrainConfig

    net = TrainConfig().build_model()  # the network's defaults are the config's, defined once there
    assert isinstance(net, UNet)
    assert tuple(net.channels) == (16, 32, 64, 128, 256)
    assert tuple(net.strides) == (2, 2, 2, 2)
    assert net.num_res_units == 2 and net.in_channels == 3 and net.out_channels == 2
    assert TrainConfig().divisor() == 16


@pytest.mark.parametrize("name", MODELS)
def test_every_model_segments_an_odd_sized_volume(name: str) -> None:
    torch.manual_seed(0)
    net = _tiny(name)
    divisor = network_divisor(name, TINY["strides"])
    # odd sizes, divisible by nothing: infer pads and cuts back (BasicUNet's fixed 16x down-sampling needs
    # at least 2 voxels per axis at the bottom for its instance norm)
    shape = (17, 20, 18) if name == "basicunet" else (19, 22, 13)
    x = torch.randn(1, 3, *shape)
    whole = infer(net, x, divisor=divisor, amp=False)
    assert whole.shape == (1, 2, *shape) and whole.dtype == torch.float32
    roi = (32, 32, 32) if name == "basicunet" else (16, 16, 16)
    tiled = infer(net, x, divisor=divisor, roi_size=roi, overlap=0.25, amp=False)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()


def test_aliases_and_unknown_names() -> None:
    assert type(build_model("Attention-UNet", **SMALL)).__name__ == "AttentionUnet"
    with pytest.raises(ValueError, match="unknown model 'vnet'.*unet.*segresnet"):
        build_model("vnet", **SMALL)
    with pytest.raises(ValueError, match="len\\(channels\\) == len\\(strides\\) \\+ 1"):
        build_model("unet", **{**SMALL, "strides": (2, 2, 2)})


def test_pad_to_divisor_round_trip() -> None:
    x = torch.arange(2 * 1 * 5 * 6 * 7, dtype=torch.float32).reshape(2, 1, 5, 6, 7)
    padded, crop = pad_to_divisor(x, 4)
    assert padded.shape == (2, 1, 8, 8, 8)
    torch.testing.assert_close(padded[crop], x)
    assert padded.sum() == x.sum()  # zero padding


def test_whole_volume_inference_equals_a_direct_forward_on_divisible_input() -> None:
    torch.manual_seed(0)
    net = _tiny("unet")
    x = torch.randn(2, 3, 16, 12, 8)
    with torch.no_grad():
        torch.testing.assert_close(infer(net, x, divisor=4, amp=False), net(x))


def test_segment_and_probabilities_agree() -> None:
    logits2 = torch.tensor([[[2.0, -1.0]], [[0.5, 3.0]]]).reshape(1, 2, 2)  # (B=1, K=2, X=2)
    assert segment(logits2).tolist() == [[False, True]]
    assert torch.all((probabilities(logits2)[:, 0] > 0.5) == segment(logits2))
    logits1 = torch.tensor([[[-0.3, 0.2]]])
    assert segment(logits1).tolist() == [[False, True]]
    assert torch.all((probabilities(logits1)[:, 0] > 0.5) == segment(logits1))
