"""MoCo's two-view augmentation, on whole uint8 batches, with per-sample randomness.

MoCo v2 draws each image's crop, flip, colour jitter, grayscale and blur
independently. torchvision's transforms draw one set of parameters per call,
so a batch would either share them (wrong: both views of every image get
related crops) or need a Python loop over images. Here each random choice is a
length-B tensor and the transforms are batched tensor ops: the crop and flip
are one per-sample affine resampling (``affine_grid`` + ``grid_sample``),
jitter is broadcast arithmetic and blur a grouped convolution. A batch of 256
small images costs a few milliseconds on CPU and runs on whatever device the
images are on. Parameters are drawn on the CPU from an optional
`torch.Generator`, so a seed gives the same views on any device.

Differences from torchvision's recipe, on purpose: the jitter order is fixed
(brightness, contrast, saturation) rather than shuffled per image, there is no
hue jitter (meaningless for the grayscale data this targets), and resampling is
bilinear without antialiasing, which suits images at most about twice the
output size (crops of 28 px images are only ever enlarged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the two-view augmentation (defaults: MoCo v2's, for RGB images).

    ``mean``/``std`` are per output channel, in [0, 1] pixel units. A
    probability of 0 turns a transform off. ``input_mode`` is what the data
    streams decode images to (``L`` or ``RGB``); gray input is replicated to
    ``channels`` at the end, so augmenting it costs a third.

    ``small_crops`` > 0 adds SwAV's multi-crop: that many extra views per image,
    cut from ``small_scale`` of it and resized to ``small_size`` px, which the
    model encodes as extra queries against the key of the second global view.
    A 16 px crop costs about a third of a 28 px view, so two of them add more
    (and more local) positives per image for less than one more view's compute.

    ``rotation`` > 0 turns each view by an angle drawn uniformly from
    ±``rotation`` degrees, in the same resampling as its crop: a small affine
    for product images, where a flip would mirror text-like details.
    """

    output_size: int = 224
    channels: int = 3
    input_mode: str = "RGB"
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_kernel: int = 23
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    small_crops: int = 0
    small_size: int = 16
    small_scale: tuple[float, float] = (0.15, 0.5)
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.input_mode not in ("L", "RGB"):
            raise ValueError(f"input_mode must be 'L' or 'RGB'; got {self.input_mode!r}")
        if self.output_size < 1 or self.channels not in (1, 3):
            raise ValueError(f"output_size must be >= 1 and channels 1 or 3; got {self.output_size}, {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ValueError(f"mean and std need {self.channels} entries each, std > 0; got {self.mean}, {self.std}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]; got {self}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd size; got {self.blur_kernel}")
        if self.small_crops < 0 or self.small_size < 1 or not 0 < self.small_scale[0] <= self.small_scale[1] <= 1:
            raise ValueError(
                f"need small_crops >= 0, small_size >= 1 and 0 < small_scale[0] <= small_scale[1] <= 1; "
                f"got {self.small_crops}, {self.small_size}, {self.small_scale}"
            )
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"rotation must lie in [0, 180] degrees; got {self.rotation}")
        probabilities = (self.flip_p, self.jitter_p, self.grayscale_p, self.blur_p)
        if not all(0.0 <= p <= 1.0 for p in probabilities):
            raise ValueError(f"probabilities must lie in [0, 1]; got {probabilities}")


def small_crop_config(config: AugmentConfig) -> AugmentConfig:
    """The augmentation of multi-crop's small views: the same photometric recipe on smaller, tighter crops."""
    blur = min(config.blur_kernel, max(1, config.small_size // 8) | 1)  # the blur kernel scaled with the crop
    return replace(config, output_size=config.small_size, scale=config.small_scale, small_crops=0, blur_kernel=blur)


# Fashion-MNIST's pixel statistics: replicated to 3 channels they normalise every channel alike.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def small_grayscale_preset(
    output_size: int = 32, mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD
) -> AugmentConfig:
    """28 px grayscale (Fashion-MNIST) → 32 px, replicated to 3 channels for the ResNet stem.

    Crops are kept larger than MoCo's 0.2 (a 28 px garment cut to a fifth is
    mostly background), and the blur kernel is scaled to the image, as MoCo's 23
    px is ~10% of 224. Saturation and grayscale are no-ops on gray input and
    are left off.
    """
    return AugmentConfig(
        output_size=output_size,
        scale=(0.3, 1.0),
        saturation=0.0,
        grayscale_p=0.0,
        blur_p=0.5,
        blur_kernel=3,
        blur_sigma=(0.1, 1.0),
        mean=(mean,) * 3,
        std=(std,) * 3,
        input_mode="L",
    )


def colour_224_preset() -> AugmentConfig:
    """MoCo v2's recipe for photos: 224 px RGB crops of 20-100% of the image, jitter, 20% gray, blur."""
    return AugmentConfig()


def colour_32_preset() -> AugmentConfig:
    """The MoCo CIFAR demo's recipe: 32 px RGB crops of 20-100%, flip, jitter (p 0.8), 20% gray, no blur."""
    return AugmentConfig(output_size=32, blur_p=0.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def colour_small_preset() -> AugmentConfig:
    """Photos at a CPU's input size (the ``photos-cpu`` preset's 64 px): the CIFAR recipe's crops of 20-100 %,
    flip, jitter (p 0.8) and 20 % gray, no blur, normalised with ImageNet's statistics (photos, not CIFAR)."""
    return AugmentConfig(output_size=64, blur_p=0.0)


PRESETS = {
    "small-grayscale": small_grayscale_preset,
    "colour-32": colour_32_preset,
    "colour-small": colour_small_preset,
    "colour-224": colour_224_preset,
}


def _as_float_batch(images: Tensor) -> Tensor:
    """uint8 ``[B, H, W]`` or ``[B, C, H, W]`` (C = 1 or 3) → float ``[B, C, H, W]`` in [0, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images; got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, H, W] or [B, C, H, W] with C in (1, 3); got {tuple(images.shape)}")
    return images.float().div_(255)


def _finish(images: Tensor, config: AugmentConfig) -> Tensor:
    """Match the channel count (gray → replicated, RGB → luminance) and normalise."""
    if images.shape[1] != config.channels:
        images = images.expand(-1, config.channels, -1, -1) if config.channels == 3 else _luminance(images)
    mean = torch.tensor(config.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def _luminance(images: Tensor) -> Tensor:
    """ITU-R 601 luma, as torchvision's grayscale; gray input is returned as is."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def eval_transform(images: Tensor, config: AugmentConfig) -> Tensor:
    """The deterministic counterpart of the training views: the whole image resized, normalised.

    A RandomResizedCrop at full scale is this same resize, so evaluation sees
    objects at the scale training saw them at most often.
    """
    images = _as_float_batch(images)
    if images.shape[-2:] != (config.output_size, config.output_size):
        size = (config.output_size, config.output_size)
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    return _finish(images.clamp_(0, 1), config)


def _uniform(low: float, high: float, count: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(count, generator=generator) * (high - low) + low


def _chance(p: float, count: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(count, generator=generator) < p


def _affine(angles: Tensor, x_scale: Tensor, y_scale: Tensor, aspect: float) -> Tensor:
    """``affine_grid``'s ``theta`` [B, 2, 3] (no shift): the output scaled to the box, then turned by ``angles``.

    ``x_scale`` is (flip ×) box width / image width, ``y_scale`` box height / image
    height, ``aspect`` image width / height. The turn is made in pixels (an output
    offset (u·w/2, v·h/2) rotated, then divided by half the image's width or
    height), so a non-square image turns without shearing; angle 0 is the plain crop.
    """
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.zeros(angles.shape[0], 2, 3)
    theta[:, 0, 0] = cos * x_scale
    theta[:, 0, 1] = -sin * y_scale / aspect
    theta[:, 1, 0] = sin * x_scale * aspect
    theta[:, 1, 1] = cos * y_scale
    return theta


def _resample(x: Tensor, theta: Tensor, size: int) -> Tensor:
    """One bilinear ``grid_sample`` of every image through its own ``theta`` to ``size`` px."""
    grid = F.affine_grid(theta.to(x.device), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's fallback (w, h): the whole image, cut to the nearest aspect ratio allowed."""
    aspect = width / height
    if aspect < ratio[0]:
        return float(width), float(round(width / ratio[0]))
    if aspect > ratio[1]:
        return float(round(height * ratio[1])), float(height)
    return float(width), float(height)


class RandomAugment(nn.Module):
    """One random view of every image in a uint8 batch: float ``[B, channels, S, S]``, normalised."""

    _ATTEMPTS = 10  # torchvision's RandomResizedCrop tries ten boxes before falling back to a centre crop

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Crop, flip and colour-augment a batch of same-sized uint8 images."""
        x = self._crop_and_flip(_as_float_batch(images), generator)
        return self._photometric(x, generator)

    def after_crop(self, crops: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Flip, turn and colour-augment a uint8 batch already cropped to ``output_size`` (see `crop_box`).

        The data streams crop each image on its own (images differ in size),
        then run the rest of the augmentation on the whole batch.
        """
        x = _as_float_batch(crops)
        if x.shape[-2:] != (self.config.output_size, self.config.output_size):
            raise ValueError(f"crops must be {self.config.output_size} px squares; got {tuple(x.shape[-2:])}")
        flip = _chance(self.config.flip_p, x.shape[0], generator).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        if self.config.rotation > 0:
            ones = torch.ones(x.shape[0])
            x = _resample(x, _affine(self._angles(x.shape[0], generator), ones, ones, 1.0), x.shape[-1])
        return self._photometric(x, generator)

    def crop_box(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple[float, ...]:
        """One RandomResizedCrop box (x0, y0, w, h) in pixels of a ``height`` × ``width`` image."""
        return tuple(self._crop_boxes(1, height, width, generator)[0].tolist())

    def _photometric(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        config = self.config
        x = self._jitter(x, generator)
        if config.grayscale_p > 0 and x.shape[1] == 3:
            gray = _chance(config.grayscale_p, x.shape[0], generator).to(x.device).view(-1, 1, 1, 1)
            x = torch.where(gray, _luminance(x).expand_as(x), x)
        if config.blur_p > 0 and config.blur_kernel > 1:
            x = self._blur(x, generator)
        return _finish(x, config)

    def _crop_boxes(self, batch: int, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        """RandomResizedCrop's boxes ``[B, 4]`` (x0, y0, w, h) in pixels, drawn as torchvision does."""
        config = self.config
        area = height * width
        shape = (batch, self._ATTEMPTS)
        scale = torch.rand(shape, generator=generator) * (config.scale[1] - config.scale[0]) + config.scale[0]
        log_lo, log_hi = math.log(config.ratio[0]), math.log(config.ratio[1])
        ratio = torch.exp(torch.rand(shape, generator=generator) * (log_hi - log_lo) + log_lo)
        w = torch.sqrt(area * scale * ratio).round()
        h = torch.sqrt(area * scale / ratio).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.float().argmax(dim=1, keepdim=True)  # the first attempt that fits
        w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), fits.any(dim=1)
        fallback_w, fallback_h = _fallback_box(height, width, config.ratio)
        w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
        x0 = torch.where(found, torch.rand(batch, generator=generator) * (width - w), (width - w) / 2)
        y0 = torch.where(found, torch.rand(batch, generator=generator) * (height - h), (height - h) / 2)
        return torch.stack([x0, y0, w, h], dim=1)

    def _crop_and_flip(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Resample each image's box (mirrored for flipped ones, turned by ``rotation``) to the output size at once."""
        batch, _, height, width = x.shape
        x0, y0, w, h = self._crop_boxes(batch, height, width, generator).unbind(dim=1)
        flip = torch.where(_chance(self.config.flip_p, batch, generator), -1.0, 1.0)
        angles = self._angles(batch, generator) if self.config.rotation > 0 else torch.zeros(batch)
        # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1] (align_corners=False)
        theta = _affine(angles, flip * w / width, h / height, width / height)
        theta[:, 0, 2] = (2 * x0 + w) / width - 1
        theta[:, 1, 2] = (2 * y0 + h) / height - 1
        return _resample(x, theta, self.config.output_size)

    def _angles(self, batch: int, generator: torch.Generator | None) -> Tensor:
        """Each view's rotation in radians, uniform in ±``rotation`` degrees."""
        return torch.deg2rad(_uniform(-self.config.rotation, self.config.rotation, batch, generator))

    def _jitter(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Per-image brightness, contrast and saturation factors; 1 (no change) where jitter is skipped."""
        config = self.config
        batch = x.shape[0]
        apply = _chance(config.jitter_p, batch, generator)

        def factor(strength: float) -> Tensor:
            drawn = _uniform(max(0.0, 1 - strength), 1 + strength, batch, generator)
            return torch.where(apply, drawn, 1.0).to(x.device).view(-1, 1, 1, 1)

        if config.brightness > 0:
            x = (x * factor(config.brightness)).clamp_(0, 1)
        if config.contrast > 0:
            mean = _luminance(x).mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * factor(config.contrast) + mean).clamp_(0, 1)
        if config.saturation > 0 and x.shape[1] == 3:
            gray = _luminance(x)
            x = ((x - gray) * factor(config.saturation) + gray).clamp_(0, 1)
        return x

    def _blur(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Separable Gaussian blur with a per-image σ (a delta kernel where blur is skipped)."""
        config = self.config
        batch, channels, height, width = x.shape
        apply = _chance(config.blur_p, batch, generator)
        sigma = _uniform(*config.blur_sigma, batch, generator)
        radius = config.blur_kernel // 2
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(offsets**2) / (2 * sigma.view(-1, 1) ** 2))
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        kernel = torch.where(apply.view(-1, 1), kernel, (offsets == 0).float())
        kernel = kernel.to(x.device).repeat_interleave(channels, dim=0)  # one kernel per (image, channel)
        planes = F.pad(x.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
        planes = F.conv2d(planes, kernel.view(-1, 1, 1, config.blur_kernel), groups=batch * channels)
        planes = F.conv2d(planes, kernel.view(-1, 1, config.blur_kernel, 1), groups=batch * channels)
        return planes.view(batch, channels, height, width)


class TwoViewAugment(nn.Module):
    """MoCo's pair of independently augmented views of each image in a uint8 batch."""

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        self.view = RandomAugment(config)

    @property
    def config(self) -> AugmentConfig:
        return self.view.config

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.view(images, generator), self.view(images, generator)
