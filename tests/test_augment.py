"""The batched two-view augmentation: shapes, normalisation, per-sample randomness, seeding."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.data.augment import AugmentConfig, RandomAugment, TwoViewAugment, eval_transform, small_grayscale_preset

PRESET = small_grayscale_preset()
# every random choice switched off: a view must then be exactly the eval transform
IDENTITY = replace(PRESET, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=0.0)


@pytest.fixture
def images(generator) -> torch.Tensor:
    return torch.randint(0, 256, (16, 28, 28), generator=generator, dtype=torch.uint8)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_views_shape_dtype_and_replicated_gray(images):
    view1, view2 = TwoViewAugment(PRESET)(images, seeded(0))
    for view in (view1, view2):
        assert view.shape == (16, 3, 32, 32)
        assert view.dtype == torch.float32
        torch.testing.assert_close(view[:, 0], view[:, 2])  # gray replicated to the three channels


def test_accepts_channel_dimension_and_rgb(images):
    assert RandomAugment(PRESET)(images.unsqueeze(1), seeded(0)).shape == (16, 3, 32, 32)
    rgb = images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    rgb_config = replace(PRESET, saturation=0.4, grayscale_p=0.2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert RandomAugment(rgb_config)(rgb, seeded(0)).shape == (16, 3, 32, 32)


def test_normalisation_uses_mean_and_std():
    gray = torch.full((2, 28, 28), 153, dtype=torch.uint8)
    expected = (153 / 255 - PRESET.mean[0]) / PRESET.std[0]
    torch.testing.assert_close(eval_transform(gray, PRESET), torch.full((2, 3, 32, 32), expected))
    torch.testing.assert_close(RandomAugment(IDENTITY)(gray, seeded(0)), torch.full((2, 3, 32, 32), expected))


def test_without_randomness_a_view_is_the_eval_transform(images):
    torch.testing.assert_close(RandomAugment(IDENTITY)(images, seeded(0)), eval_transform(images, IDENTITY))


def test_flip_mirrors_the_image(images):
    flipped = RandomAugment(replace(IDENTITY, flip_p=1.0))(images, seeded(0))
    torch.testing.assert_close(flipped, eval_transform(images, IDENTITY).flip(-1))


def test_rotation_turns_each_view_as_torchvision_rotates_it():
    """A naive reference: torchvision's bilinear rotate of each image by the angle the view drew (whole-image crops)."""
    from torchvision.transforms.v2 import functional as reference

    config = replace(IDENTITY, output_size=28, rotation=30.0)
    shapes = torch.zeros(6, 28, 28, dtype=torch.uint8)
    shapes[:, 6:22, 12:16], shapes[:, 6:9, 8:20] = 255, 200  # a "T" with a black border: nothing crosses the edge
    augment = RandomAugment(config)
    for view, draws_before_angles in (
        (lambda g: augment(shapes, g), lambda g: (augment._crop_boxes(6, 28, 28, g), torch.rand(6, generator=g))),
        (lambda g: augment.after_crop(shapes.unsqueeze(1), g), lambda g: torch.rand(6, generator=g)),  # flip chance
    ):
        turned = view(seeded(3))
        replay = seeded(3)
        draws_before_angles(replay)
        angles = torch.rad2deg(augment._angles(6, replay))
        assert angles.abs().max() <= 30 and angles.std() > 5
        pixels = shapes.float().div(255).unsqueeze(1)
        bilinear = reference.InterpolationMode.BILINEAR
        rotated = torch.stack([reference.rotate(pixels[i], float(a), bilinear) for i, a in enumerate(angles)])
        expected = ((rotated - config.mean[0]) / config.std[0]).expand(-1, 3, -1, -1)  # normalised, gray replicated
        torch.testing.assert_close(turned, expected, atol=1e-4, rtol=0)
    assert not torch.equal(RandomAugment(config)(shapes, seeded(3)), eval_transform(shapes, config))
    with pytest.raises(ValueError, match="rotation"):
        AugmentConfig(rotation=-1)


def test_two_views_differ(images):
    view1, view2 = TwoViewAugment(PRESET)(images, seeded(0))
    assert (view1 - view2).abs().mean(dim=(1, 2, 3)).min() > 0  # every image's pair differs


def test_randomness_is_per_sample(images):
    same_image = images[:1].expand(16, -1, -1)
    views = RandomAugment(PRESET)(same_image, seeded(0))
    distinct = {tuple(view.flatten()[::97].tolist()) for view in views}
    assert len(distinct) == 16  # 16 copies of one image, 16 different augmentations


def test_seeded_views_are_reproducible(images):
    augment = TwoViewAugment(PRESET)
    first, again, other = augment(images, seeded(7)), augment(images, seeded(7)), augment(images, seeded(8))
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], other[0])


def test_eval_transform_is_deterministic_and_keeps_content(images):
    once, twice = eval_transform(images, PRESET), eval_transform(images, PRESET)
    torch.testing.assert_close(once, twice, rtol=0, atol=0)
    assert once.shape == (16, 3, 32, 32)
    same_size = eval_transform(images, replace(PRESET, output_size=28))
    expected = (images.float() / 255 - PRESET.mean[0]) / PRESET.std[0]
    torch.testing.assert_close(same_size[:, 0], expected)  # no resize needed: pixels untouched


def test_crops_stay_inside_the_image_and_respect_scale():
    augment = RandomAugment(PRESET)
    boxes = augment._crop_boxes(4096, 28, 28, seeded(0))
    x0, y0, w, h = boxes.unbind(dim=1)
    assert torch.all((x0 >= 0) & (y0 >= 0) & (x0 + w <= 28) & (y0 + h <= 28))
    area = w * h / (28 * 28)
    assert torch.all((area >= PRESET.scale[0] * 0.9) & (area <= 1.0))


def test_rejects_bad_inputs_and_configs():
    with pytest.raises(ValueError, match="expected uint8"):
        eval_transform(torch.zeros(2, 28, 28), PRESET)
    with pytest.raises(ValueError, match=r"expected images \[B, H, W\]"):
        RandomAugment(PRESET)(torch.zeros(2, 2, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="blur_kernel"):
        AugmentConfig(blur_kernel=4)
    with pytest.raises(ValueError, match="mean and std"):
        AugmentConfig(mean=(0.5,))
