"""Network factory and the one inference helper shared by validation and prediction.

``build_model`` maps a name to a MONAI 3D network. The default reproduces the published network
(MONAI ``UNet``, channels 16-256, strides 2x4, two residual units); the others are there so a user can
swap the architecture from the config without touching code. ``network_divisor`` says by what every
spatial size must be divisible so that skip connections line up; the data pipeline and ``infer`` pad
to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("unet", "segresnet", "dynunet", "attentionunet", "basicunet")
_ALIASES = {"attention_unet": "attentionunet", "basic_unet": "basicunet", "dyn_unet": "dynunet",
            "seg_res_net": "segresnet"}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return key


def build_model(
    name: str = "unet",
    in_channels: int = 3,
    out_channels: int = 2,
    *,
    channels: Sequence[int],
    strides: Sequence[int],
    num_res_units: int,
    dropout: float,
    **kwargs: Any,
) -> nn.Module:
    """A 3D segmentation network by name (one of ``MODELS``).

    ``channels``/``strides`` are interpreted per architecture so one config describes them all:
    ``unet``/``attentionunet`` take them as is; ``dynunet`` uses ``channels`` as filters and prepends a
    stride-1 stem; ``segresnet`` takes ``channels[0]`` as ``init_filters`` and ``len(strides)`` down
    stages; ``basicunet`` needs six features and gets ``channels[:5] + (channels[0],)``.
    Extra keyword arguments go to the MONAI constructor unchanged.
    """
    from monai.networks import nets

    key = _canonical(name)
    channels = tuple(int(c) for c in channels)
    strides = tuple(int(s) for s in strides)
    if key in ("unet", "attentionunet", "dynunet") and len(channels) != len(strides) + 1:
        raise ValueError(
            f"model {key!r} needs len(channels) == len(strides) + 1, got channels={channels} strides={strides}"
        )
    if key == "unet":
        return nets.UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                         channels=channels, strides=strides, num_res_units=num_res_units,
                         dropout=dropout, **kwargs)
    if key == "attentionunet":
        return nets.AttentionUnet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                                  channels=channels, strides=strides, dropout=dropout, **kwargs)
    if key == "dynunet":
        all_strides = (1, *strides)
        return nets.DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                            kernel_size=[3] * len(all_strides), strides=list(all_strides),
                            upsample_kernel_size=list(strides), filters=list(channels),
                            dropout=dropout or None, res_block=num_res_units > 0, **kwargs)
    if key == "segresnet":
        n_down = len(strides) + 1
        blocks_down = kwargs.pop("blocks_down", tuple([1, 2, 2, 4, 4, 4][:n_down]))
        blocks_up = kwargs.pop("blocks_up", tuple([1] * (len(blocks_down) - 1)))
        # GroupNorm needs channels divisible by num_groups; tiny test networks use few filters
        num_groups = kwargs.pop("num_groups", math.gcd(8, channels[0]))
        return nets.SegResNet(spatial_dims=3, init_filters=channels[0], in_channels=in_channels,
                              out_channels=out_channels, dropout_prob=dropout or None,
                              blocks_down=blocks_down, blocks_up=blocks_up,
                              norm=("GROUP", {"num_groups": num_groups}), **kwargs)
    # basicunet: fixed four down-samplings by 2
    if len(channels) < 5:
        raise ValueError(f"model 'basicunet' needs at least 5 channels, got {channels}")
    features = kwargs.pop("features", (*channels[:5], channels[0]))
    return nets.BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                          features=features, dropout=dropout, **kwargs)


_NETWORK_CLASSES = {"unet": "UNet", "attentionunet": "AttentionUnet", "dynunet": "DynUNet",
                    "segresnet": "SegResNet", "basicunet": "BasicUNet"}


def check_model_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """A one-line ValueError naming any key of ``kwargs`` that the MONAI constructor of ``name`` does not take."""
    import inspect

    if not kwargs:
        return
    from monai.networks import nets

    key = _canonical(name)
    cls = getattr(nets, _NETWORK_CLASSES[key])
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = sorted(set(params) - {"self"})
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a parameter of model {key!r} (MONAI {cls.__name__}); "
                         f"valid: {', '.join(accepted)}")


def network_divisor(name: str, strides: Sequence[int], **kwargs: Any) -> int:
    """The factor every spatial size must be divisible by for the network ``name`` (its total stride)."""
    key = _canonical(name)
    if key == "basicunet":
        return 16
    if key == "segresnet":
        n_down = len(kwargs.get("blocks_down", [None] * (len(strides) + 1)))
        return 2 ** (n_down - 1)
    return int(math.prod(int(s) for s in strides))


def pad_to_divisor(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial dims of ``x`` (B, C, *spatial) up to multiples of ``divisor``.

    Returns the padded tensor and the slices that cut the original region back out, so predictions are
    scored and written on exactly the input grid (padding never counts as a false positive).
    """
    spatial = x.shape[2:]
    target = [int(math.ceil(s / divisor) * divisor) for s in spatial]
    pad: list[int] = []
    for s, t in zip(reversed(spatial), reversed(target), strict=True):
        pad += [0, t - s]
    crop = (slice(None), slice(None), *(slice(0, s) for s in spatial))
    if not any(pad):
        return x, crop
    return F.pad(x, pad), crop


@torch.no_grad()
def infer(
    model: nn.Module,
    image: torch.Tensor,
    divisor: int = 16,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    *,
    amp: bool,
) -> torch.Tensor:
    """Logits for a (B, C, *spatial) image on its own grid.

    With ``roi_size`` None the whole volume goes through the network at once (padded to ``divisor`` and
    cut back); otherwise MONAI ``sliding_window_inference`` tiles it with Gaussian blending, which bounds
    memory for full-size MRI. ``amp`` turns on bf16 autocast on CUDA; logits come back as float32.
    """
    use_amp = amp and image.device.type == "cuda"
    with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16, enabled=use_amp):
        if roi_size is None:
            padded, crop = pad_to_divisor(image, divisor)
            out = model(padded)[crop]
        else:
            from monai.inferers import sliding_window_inference

            roi = [int(r) for r in roi_size]
            # a volume smaller than the window would be padded by MONAI anyway; keep it divisible
            padded, crop = pad_to_divisor(image, divisor)
            out = sliding_window_inference(padded, roi, sw_batch_size, model, overlap=overlap,
                                           mode="gaussian")
            out = out[crop]
    # MONAI hands back MetaTensors when given them; callers want plain float32 tensors
    return out.float().as_subclass(torch.Tensor)


def inference_memory_bytes(image_shape: Sequence[int], roi_size: Sequence[int] | None, channels: Sequence[int],
                           in_channels: int, out_channels: int = 2, sw_batch_size: int = 2,
                           strides: Sequence[int] | None = None) -> int:
    """A generous estimate of the memory one inference of a (C, X, Y, Z) image takes: the network's feature
    maps for one pass (``sw_batch_size`` windows, or the whole padded volume) and the sliding window's
    float32 buffers over the padded volume (MONAI pads a volume smaller than the window up to it).

    Three feature maps per level at a time; measured on a 2-core CPU (torch 2.13, no_grad) the peak was
    1.1-1.7 maps per level (UNet 8-64 without and 16-256 with residual units at a 96^3 window), so the
    estimate is about twice what inference takes: it refuses what cannot fit, not what barely fits.
    """
    spatial = [int(s) for s in image_shape[-3:]]
    if roi_size is None:
        window, batch = spatial, 1
        padded = spatial
    else:
        window, batch = [int(r) for r in roi_size], int(sw_batch_size)
        padded = [max(s, r) for s, r in zip(spatial, window, strict=True)]
    strides = list(strides) if strides is not None else [2] * (len(channels) - 1)
    voxels, scale, per_voxel = float(np.prod(window)), 1.0, 0.0
    for level, c in enumerate(channels):
        per_voxel += c / scale
        if level < len(strides):
            scale *= float(strides[level]) ** 3
    features = 3 * 4 * batch * voxels * per_voxel
    buffers = 4 * float(np.prod(padded)) * (in_channels + 2 * out_channels + 2)
    return int(features + buffers)


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory free for inference on ``device``: the GPU's free memory, else the system's available RAM
    (``MemAvailable``); None when it cannot be told."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_inference_memory(image_shape: Sequence[int], roi_size: Sequence[int] | None, channels: Sequence[int],
                           in_channels: int, device: torch.device, strides: Sequence[int] | None = None,
                           what: str = "") -> None:
    """A ValueError, before inference starts, when :func:`inference_memory_bytes` exceeds what ``device``
    has free (a 999^3 window once grew to 21 GB and was killed by the out-of-memory killer, without a word)."""
    need = inference_memory_bytes(image_shape, roi_size, channels, in_channels, strides=strides)
    free = available_memory_bytes(device)
    if free is None or need <= free:
        return
    shape = "x".join(str(int(s)) for s in image_shape[-3:])
    how = (f"a sliding window of {'x'.join(str(int(r)) for r in roi_size)}" if roi_size is not None
           else "the whole volume at once")
    fix = ("choose a smaller window (--roi; a window larger than the volume is padded up to it)"
           if roi_size is not None else "use --sliding-window with a --roi that fits")
    raise ValueError(f"inference{what} of a {shape} volume with {how} needs about {need / 2**30:.1f} GiB, but "
                     f"{device.type} has {free / 2**30:.1f} GiB free; {fix}")


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Foreground probability (B, 1, *spatial): sigmoid for one output channel, else 1 - softmax background."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return 1.0 - torch.softmax(logits, dim=1)[:, :1]


def segment(logits: torch.Tensor) -> torch.Tensor:
    """Binary tumour mask (B, *spatial), bool: argmax over classes, or sigmoid > 0.5 for one channel."""
    if logits.shape[1] == 1:
        return logits[:, 0] > 0
    return logits.argmax(dim=1) > 0
