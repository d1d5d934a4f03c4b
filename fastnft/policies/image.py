"""Camera images -> SigLIP pixels on the policy's device, without torchvision.

SigLIP (PaliGemma) takes square RGB images scaled to [-1, 1] (``x / 255 * 2 - 1``). Camera frames of another size
keep their aspect ratio: resized to fit and padded to the square exactly as openpi's PyTorch model does
(``openpi.shared.image_tools.resize_with_pad_torch``, also lerobot's pi0): in [-1, 1] space, bilinear without
antialiasing, sizes ``int(h / ratio)`` (floor), clamp to [-1, 1], pad with -1 (black).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize_with_pad", "siglip_pixels", "to_channels_first"]


def to_channels_first(images: Tensor) -> Tensor:
    """``[B, H, W, 3]`` or ``[B, 3, H, W]`` -> ``[B, 3, H, W]``.

    The layout is read from where the size-3 axis is; an image that is 3 pixels tall *and* RGB-last is ambiguous
    and must be passed channels-first.

    Raises:
        ValueError: not 4-D, or no axis of size 3 (1 and 4 channels are not RGB).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, H, W, 3] or [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] == 3:
        return images
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError(f"images must have 3 (RGB) channels first or last, got shape {tuple(images.shape)}")


def resize_with_pad(images: Tensor, size: int, pad_value: float = -1.0) -> Tensor:
    """Resize ``[B, C, H, W]`` float images in [-1, 1] to fit ``size x size`` keeping the aspect ratio, pad centrally.

    openpi-PyTorch's ``resize_with_pad_torch``, step for step: ``ratio = max(W / size, H / size)``, new size
    ``(int(H / ratio), int(W / ratio))``, bilinear with ``align_corners=False`` and no antialiasing (a downscale
    aliases, as in openpi and lerobot; PIL / ``antialias=True`` differs by up to ~0.4 at 256 -> 224 px), clamp to
    [-1, 1], pad ``(size - new) // 2`` before and the rest after with ``pad_value``. An image already
    ``size x size`` is returned unchanged.
    """
    _, _, h, w = images.shape
    if h == size and w == size:
        return images
    ratio = max(w / size, h / size)
    nh, nw = max(1, int(h / ratio)), max(1, int(w / ratio))
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(out, (left, size - nw - left, top, size - nh - top), value=pad_value)


def siglip_pixels(images: Tensor, size: int, device: torch.device | str | None = None) -> Tensor:
    """Camera frames -> SigLIP input.

    Args:
        images: ``[B, H, W, 3]`` or ``[B, 3, H, W]``; uint8 in [0, 255] or float in [0, 1].
        size: SigLIP resolution (224 for PaliGemma-224).
        device: target device (the policy's); the work runs there.

    Returns:
        ``[B, 3, size, size]`` float32 in [-1, 1].

    Raises:
        ValueError: bad layout (see :func:`to_channels_first`) or float images outside [0, 1].
    """
    x = to_channels_first(images.to(device) if device is not None else images)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0 * 2.0 - 1.0  # openpi's Observation.from_dict
    else:
        x = x.float()
        if x.numel() and (float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3):
            raise ValueError("float images must be in [0, 1] (or pass uint8 in [0, 255]); got values in "
                             f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")
        x = x * 2.0 - 1.0
    return resize_with_pad(x, size, pad_value=-1.0)
