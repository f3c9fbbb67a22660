"""A small colour photo corpus made offline from the sample photographs installed packages ship.

A user's own photos are what the colour preset (``photos-cpu``) and label-free
evaluation are for, but a test or a benchmark needs photos that every machine
has, without a download. scikit-image and matplotlib install a handful of
photographs (an astronaut, a cat, coffee, a rocket, Grace Hopper, a retina,
the Hubble deep field, textures...). Each becomes one "class" of many pictures:
random crops of 10-100 % of its area, resized so the longer side is 64-300 px,
sometimes mirrored, saved as JPEG — the mix of sizes and framings of a real
folder of pictures. A crop's class is the photo it was cut from, so the folder
is labelled (class subfolders) for the retrieval suite, or flat (``labelled=False``)
as most users' folders are.

Different seeds give different crops of the same photos: ``--seed 0`` for the
training folder and ``--seed 1`` for held-out queries, as a train/test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from artifacts.atomic import building_dir

# (class name, package, file inside the package's data): 12 colour and 7 gray photographs
SAMPLE_PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("astronaut", "skimage", "data/astronaut.png"),
    ("cat", "skimage", "data/chelsea.png"),
    ("coffee", "skimage", "data/coffee.png"),
    ("colour-chart", "skimage", "data/color.png"),
    ("hubble", "skimage", "data/hubble_deep_field.jpg"),
    ("tissue", "skimage", "data/ihc.png"),
    ("logo", "skimage", "data/logo.png"),
    ("motorcycle", "skimage", "data/motorcycle_left.png"),
    ("retina", "skimage", "data/retina.jpg"),
    ("rocket", "skimage", "data/rocket.jpg"),
    ("grace-hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("present", "matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
    ("camera", "skimage", "data/camera.png"),
    ("brick", "skimage", "data/brick.png"),
    ("grass", "skimage", "data/grass.png"),
    ("gravel", "skimage", "data/gravel.png"),
    ("moon", "skimage", "data/moon.png"),
    ("coins", "skimage", "data/coins.png"),
    ("cells", "skimage", "data/cell.png"),
)


@dataclass(frozen=True)
class SamplePhotosConfig:
    """How many pictures per photo, how they are cut, and whether class folders are written."""

    per_photo: int = 100
    seed: int = 0
    labelled: bool = True
    area: tuple[float, float] = (0.1, 1.0)  # of the photo's area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    side: tuple[int, int] = (64, 300)  # the longer side of each saved picture, px
    flip_p: float = 0.5
    quality: int = 90

    def __post_init__(self) -> None:
        if self.per_photo < 1:
            raise ValueError(f"per_photo must be >= 1; got {self.per_photo}")
        if not 0 < self.area[0] <= self.area[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"need 0 < area[0] <= area[1] <= 1 and 0 < ratio[0] <= ratio[1]; got {self}")
        if not 8 <= self.side[0] <= self.side[1]:
            raise ValueError(f"need 8 <= side[0] <= side[1]; got {self.side}")


def load_sample_photo(package: str, relative: str) -> Image.Image:
    """One shipped photograph as RGB (transparency flattened on white); a clear error if the package lacks it."""
    try:
        path = resources.files(package).joinpath(relative)
        with resources.as_file(path) as file, Image.open(file) as image:
            image.load()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as error:
        raise FileNotFoundError(f"sample photo {relative} of {package} is not installed ({error})") from None
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _crop(image: Image.Image, rng: np.random.Generator, config: SamplePhotosConfig) -> Image.Image:
    """A random box of the configured area and aspect ratio, resized to a random longer side, maybe mirrored."""
    width, height = image.size
    area = width * height * rng.uniform(*config.area)
    aspect = math.exp(rng.uniform(math.log(config.ratio[0]), math.log(config.ratio[1])))
    box_w = min(width, max(8, round(math.sqrt(area * aspect))))
    box_h = min(height, max(8, round(math.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    side = int(rng.integers(config.side[0], config.side[1] + 1))
    scale = side / max(box_w, box_h)
    size = (max(1, round(box_w * scale)), max(1, round(box_h * scale)))
    crop = image.resize(size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + box_w, y0 + box_h))
    return ImageOps.mirror(crop) if rng.random() < config.flip_p else crop


def write_sample_photos(out: Path, config: SamplePhotosConfig = SamplePhotosConfig()) -> int:
    """Write ``per_photo`` pictures of each sample photo into the new folder ``out``; returns how many.

    The folder appears whole or not at all (built beside it, then renamed), and is never written over.

    Labelled: ``out/<class>/<class>-0007.jpg``; unlabelled: ``out/<class>-0007.jpg`` (the names still
    tell a reader where each came from; the folder source gives flat files no label).
    """
    out = Path(out)
    written = 0
    with building_dir(out) as folder:
        for index, (name, package, relative) in enumerate(SAMPLE_PHOTOS):
            photo = load_sample_photo(package, relative)
            rng = np.random.default_rng([config.seed, index])
            target = folder / name if config.labelled else folder
            target.mkdir(exist_ok=True)
            for number in range(config.per_photo):
                _crop(photo, rng, config).save(target / f"{name}-{number:04d}.jpg", quality=config.quality)
                written += 1
    return written
