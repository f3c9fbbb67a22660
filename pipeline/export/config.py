"""What `mocoplus export` exports and how it checks it.

Torch-free, so the command line reads its defaults and choices from here without loading the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from artifacts.settings import Help

EncoderChoice = Literal["key", "query"]  # the momentum (key) encoder or the trained query encoder
HeadChoice = Literal["none", "projection"]  # backbone features, or through the MoCo projection head
QuantizeChoice = Literal["none", "int8"]
PARITY_BATCH_SIZES = (1, 7, 64)


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how it is checked. ``calibration`` empty: the run's held-out (else training) shards."""

    checkpoint: Annotated[str, Help("auto (best if any, else last), best, last, or a checkpoint path.")] = "auto"
    encoder: Annotated[EncoderChoice, Help("key (the momentum encoder) or query.")] = "key"
    head: Annotated[HeadChoice, Help("none (backbone features) or projection (the MoCo head).")] = "none"
    opset: Annotated[int, Help("ONNX opset.")] = 18
    calibration: Annotated[
        str,
        Help(
            "Shards for the parity check and int8 calibration (default: the run's held-out shards for "
            "parity, its training shards for calibration)."
        ),
    ] = ""
    parity_images: int = 256
    tolerance: float = 1e-4  # max abs difference from eager fp32 (TorchScript, fp32 ONNX)
    quantize: Annotated[QuantizeChoice, Help("none, or int8 (static QDQ, calibrated on real images).")] = "none"
    calibration_images: int = 512  # int8: images calibrating the activation ranges
    min_cosine: float = 0.99  # int8: least mean cosine to eager fp32
    name: str = ""  # default: the run folder's name
    grid: Annotated[int | None, Help("Pool the embedding over a grid×grid grid (default: the run's).")] = None
    whiten: Annotated[
        bool | None,
        Help(
            "PCA-whiten the embedding in the graph, fitted on --whiten-data (default: the run's "
            "model.embedding_whitening; with --quantize int8 reduced to 256 directions unless --dims)."
        ),
    ] = None
    whiten_data: Annotated[str, Help("Shards the whitening is fitted on (default: the run's training shards).")] = ""
    whiten_images: Annotated[int, Help("Fit the whitening on at most this many images (0: all of them).")] = 0
    dims: Annotated[
        int | None,
        Help(
            "Keep the whitening's leading D principal directions: a D-dim embedding "
            "(default: the run's model.embedding_dims; --quantize int8: at most 256)."
        ),
    ] = None

    def __post_init__(self) -> None:
        if self.encoder not in get_args(EncoderChoice) or self.head not in get_args(HeadChoice):
            raise ValueError(f"encoder must be key or query and head none or projection; got {self}")
        if not 7 <= self.opset <= 23:
            raise ValueError(f"opset must lie in 7..23; got {self.opset}")
        if self.parity_images < max(PARITY_BATCH_SIZES) or not self.tolerance > 0:
            raise ValueError(f"need parity_images >= {max(PARITY_BATCH_SIZES)} and tolerance > 0")
        if self.quantize not in get_args(QuantizeChoice) or self.calibration_images < 1 or not 0 < self.min_cosine <= 1:
            raise ValueError(f"quantize must be none or int8, calibration_images >= 1, 0 < min_cosine <= 1; got {self}")
        if self.whiten_images < 0:
            raise ValueError(f"whiten_images must be >= 0; got {self.whiten_images}")
        if self.grid is not None and self.grid < 1:
            raise ValueError(f"grid must be >= 1 (or unset: the run's); got {self.grid}")
        if self.dims is not None and (self.dims < 1 or self.whiten is False):
            raise ValueError(
                "dims keeps the whitening's leading directions: needs dims >= 1 and whitening; "
                f"got dims {self.dims}, whiten {self.whiten}"
            )
        if self.whiten and self.head == "projection":
            raise ValueError("whitening applies to backbone features: export it with head none")

    @property
    def precision(self) -> str:
        return "int8-static-qdq" if self.quantize == "int8" else "fp32"
