"""Settings of the evaluations that the CLI needs without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViewConfig:
    """The sample, the views per picture and how far each view departs from its original.

    Defaults: 500 pictures × 4 views; crops of 50-100 % of the area (their aspect the picture's, changed by a
    factor within ``ratio``), the copy 50-100 % of the crop's size,
    brightness/contrast/saturation ×0.7-1.3, mirrored half the time, re-encoded as JPEG at quality 30-90.
    """

    sample: int = 500
    views: int = 4
    seed: int = 0
    area: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rescale: tuple[float, float] = (0.5, 1.0)
    colour: float = 0.3
    flip_p: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 90)
    ks: tuple[int, ...] = (1, 10)

    def __post_init__(self) -> None:
        if self.sample < 1 or self.views < 1:
            raise ValueError(f"need a sample >= 1 and views >= 1; got {self.sample}, {self.views}")
        if not 0 < self.area[0] <= self.area[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"need 0 < area[0] <= area[1] <= 1 and 0 < ratio[0] <= ratio[1]; got {self}")
        if not 0 < self.rescale[0] <= self.rescale[1] <= 1 or not 0 <= self.colour < 1:
            raise ValueError(f"need 0 < rescale[0] <= rescale[1] <= 1 and 0 <= colour < 1; got {self}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 95 or not 0 <= self.flip_p <= 1:
            raise ValueError(f"need 1 <= jpeg_quality[0] <= jpeg_quality[1] <= 95 and 0 <= flip_p <= 1; got {self}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive; got {self.ks}")
