"""The model bundle contract: write ``model.json`` (`mocoplus export`), open a bundle with ONNX Runtime
and embed uint8 images — no torch here.

The embedding jobs, the index builder's checks and the service all load
models through `ModelBundle`, so they agree on one contract: ``model.json``
is read and checked against the ONNX graph's declared input and output
before anything runs, and every batch is checked against it before it
reaches ONNX Runtime (a float array, a wrong size or a missing channel
axis is a `ValueError` naming what was expected, not an ONNX Runtime error).

Execution providers are chosen, not guessed: ``cpu`` (default) or ``cuda``,
where ``cuda`` fails unless ONNX Runtime has the CUDA provider *and* the
session really uses it — ONNX Runtime would otherwise fall back to the CPU
silently. On CUDA the session runs on ``device_id`` with cuDNN's heuristic
convolution choice (`cuda_provider_options`), and ``onnxruntime.preload_dlls``
first loads CUDA and cuDNN from their pip wheels, where they come from (torch,
which would otherwise load them, is never imported here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from artifacts.jsonfile import read_json
from artifacts.versions import resolve_version

BUNDLE_FORMAT = 1
MODEL_JSON, ONNX_FILE, TORCHSCRIPT_FILE = "model.json", "encoder.onnx", "encoder.pt"
INPUT_NAME, OUTPUT_NAME = "images", "embedding"
Provider = Literal["cpu", "cuda"]  # chosen, never guessed: cuda fails rather than fall back to the CPU
PROVIDERS: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# cuDNN's convolution choice in the CUDA provider: EXHAUSTIVE (ONNX Runtime's default) times every
# algorithm at each new input shape, so the first request at each batch size waits seconds
CONV_ALGO_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
# What defines the embedding function: two bundles with the same hash embed alike.
HASHED_FIELDS = ("format", "input", "output", "encoder", "head", "opset", "precision")


class BundleError(ValueError):
    """A model bundle that is missing, unreadable, or inconsistent with its ``model.json``."""


def bundle_hash(info: dict[str, Any]) -> str:
    """sha256 over the contract fields of ``model.json`` and the ONNX file's own sha256.

    Excludes what varies between two exports of one checkpoint (creation time,
    paths, the TorchScript archive), so embeddings and indexes can name the
    model they came from and be matched against it.
    """
    try:
        content = {name: info[name] for name in HASHED_FIELDS} | {"onnx_sha256": info["files"][ONNX_FILE]}
    except KeyError as error:
        raise BundleError(f"model.json lacks {error}") from None
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def cuda_provider_options(device_id: int = 0, conv_algo_search: str = "HEURISTIC") -> dict[str, str]:
    """The CUDA execution provider's options: which GPU, and how cuDNN picks its convolutions."""
    if device_id < 0:
        raise ValueError(f"device_id must be >= 0; got {device_id}")
    if conv_algo_search not in CONV_ALGO_SEARCH:
        choices = ", ".join(CONV_ALGO_SEARCH)
        raise ValueError(f"cudnn_conv_algo_search must be one of {choices}; got {conv_algo_search!r}")
    return {"device_id": str(device_id), "cudnn_conv_algo_search": conv_algo_search}


def preload_cuda_libraries(ort: Any) -> None:
    """``onnxruntime.preload_dlls()`` (ONNX Runtime >= 1.21): CUDA and cuDNN from the nvidia-* pip wheels.

    Without it a pip-only install (no system CUDA) finds no libcudnn unless torch happened to load it first.
    Older ONNX Runtimes lack it; a failure here is left to the session, which then names what is missing.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.suppress(OSError, RuntimeError):
        preload()


def resolve_model(bundle_dir: Path | str) -> Path:
    """The bundle folder ``bundle_dir`` names: itself, or the version its ``current`` link names (a model root
    the ``pretrain`` flow publishes into, `artifacts.versions`)."""
    return resolve_version(Path(bundle_dir), marker=MODEL_JSON)


def read_model_json(bundle_dir: Path) -> dict[str, Any]:
    path = resolve_model(bundle_dir) / MODEL_JSON
    info = read_json(path, BundleError, f"{bundle_dir} is not a model bundle: no {MODEL_JSON}")
    if info.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a format-{BUNDLE_FORMAT} model.json")
    if info.get("bundle_hash") != bundle_hash(info):
        raise BundleError(f"{path}: bundle_hash does not match its contents (edited or corrupt)")
    return info


@dataclass(frozen=True)
class InputContract:
    height: int
    width: int
    channels: int
    dim: int

    @classmethod
    def from_model_json(cls, info: dict[str, Any]) -> InputContract:
        try:
            _, height, width, channels = info["input"]["shape"]
            return cls(int(height), int(width), int(channels), int(info["output"]["dim"]))
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"model.json: malformed input/output contract ({error})") from None

    def check(self, images: np.ndarray) -> None:
        """``images`` must be uint8 ``[N, H, W, C]`` at the bundle's size; else a `ValueError` saying so."""
        expected = f"uint8 [N, {self.height}, {self.width}, {self.channels}]"
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f"images must be {expected} RGB; got {kind}")
        if images.ndim != 4 or images.shape[1:] != (self.height, self.width, self.channels) or len(images) == 0:
            raise ValueError(f"images must be {expected} RGB with N >= 1; got shape {list(images.shape)}")


class ModelBundle:
    """An exported encoder, ready to embed: ``ModelBundle(path).embed(uint8 [N, H, W, 3]) → float32 [N, D]``."""

    def __init__(
        self,
        path: Path | str,
        *,
        provider: str = "cpu",
        threads: int = 0,
        spin: bool = True,
        device_id: int = 0,
        cudnn_conv_algo_search: str = "HEURISTIC",
    ) -> None:
        """``spin=False`` stops idle ONNX Runtime threads from busy-waiting: right when other
        processes (decoding workers) share the cores, where spinning threads steal their time.
        ``device_id`` and ``cudnn_conv_algo_search`` apply to ``provider="cuda"``."""
        try:
            import onnxruntime as ort  # deferred: reading model.json alone needs no runtime
        except ImportError:
            raise BundleError(
                "ONNX Runtime is not installed: pip install 'mocoplus[cpu]' (or 'mocoplus[gpu]', docs/gpu.md)"
            ) from None

        self.path = resolve_model(path)
        self.info = read_model_json(self.path)
        self.contract = InputContract.from_model_json(self.info)
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
        wanted = PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            raise BundleError(
                f"provider {provider!r} asked for, but this ONNX Runtime has only {ort.get_available_providers()}"
                " (for CUDA: the gpu extra instead of the cpu one, docs/gpu.md)"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        onnx_path = self.path / ONNX_FILE
        if not onnx_path.is_file():
            raise BundleError(f"{self.path}: no {ONNX_FILE}")
        providers: list[Any] = [wanted]
        if provider == "cuda":
            preload_cuda_libraries(ort)
            providers = [(wanted, cuda_provider_options(device_id, cudnn_conv_algo_search))]
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as error:  # ONNX Runtime raises its own exception types for a corrupt graph
            raise BundleError(f"{onnx_path}: ONNX Runtime cannot load it ({error})") from None
        if self.session.get_providers()[0] != wanted:
            raise BundleError(f"ONNX Runtime fell back to {self.session.get_providers()} instead of {wanted}")
        self.provider = provider
        self._check_graph()

    def _check_graph(self) -> None:
        """The graph's declared input/output must be what model.json promises."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        c = self.contract
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
            raise BundleError(f"{ONNX_FILE}: expected one uint8 input {INPUT_NAME!r}; got {_describe(inputs)}")
        if list(inputs[0].shape[1:]) != [c.height, c.width, c.channels]:
            raise BundleError(f"{ONNX_FILE}: input shape {inputs[0].shape} is not model.json's {self.info['input']}")
        if len(outputs) != 1 or outputs[0].name != OUTPUT_NAME or outputs[0].type != "tensor(float)":
            raise BundleError(f"{ONNX_FILE}: expected one float output {OUTPUT_NAME!r}; got {_describe(outputs)}")
        if outputs[0].shape[-1] != c.dim:
            raise BundleError(f"{ONNX_FILE}: output dim {outputs[0].shape[-1]} is not model.json's {c.dim}")

    @property
    def hash(self) -> str:
        return self.info["bundle_hash"]

    @property
    def dim(self) -> int:
        return self.contract.dim

    @property
    def size(self) -> int:
        return self.contract.height

    def embed(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised float32 embeddings ``[N, D]`` of uint8 RGB images ``[N, H, W, 3]``."""
        self.contract.check(images)
        (embeddings,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})
        return embeddings


def _describe(values: list[Any]) -> str:
    return ", ".join(f"{value.name}: {value.type} {value.shape}" for value in values) or "none"


# --- the writer side (`mocoplus export`) -------------------------------------------------------------


def model_contract(
    size: int,
    dim: int,
    trained_mode: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    encoder: str,
    head: str,
    opset: int,
    precision: str,
    whitening: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The part of ``model.json`` that defines the embedding function (and so the bundle hash).

    ``whitening``: None, or the PCA whitening in the graph before the normalisation and what it was fitted on.
    """
    return {
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NHWC",
            "shape": ["N", size, size, 3],
            "color": "RGB",
            "resize": {
                "policy": "shorter-side-then-centre-crop",
                "size": size,
                "interpolation": "bilinear (PIL), antialiased when shrinking",
                "crop_origin": "floor((side - size) / 2)",
            },
            "in_graph": "x / 255; luma (ITU-R 601) replicated to the network's channels for gray-trained "
            "models; (x - mean) / std",
            "trained_mode": trained_mode,
            "mean": list(mean),
            "std": list(std),
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "dim": dim, "normalized": "l2"},
        "whitening": whitening,
        "encoder": encoder,
        "head": head,
        "opset": opset,
        "precision": precision,
    }


def write_model_json(folder: Path, info: dict[str, Any]) -> None:
    """``model.json`` with its ``bundle_hash`` (over the contract fields and the ONNX file) set from ``info``."""
    info["bundle_hash"] = bundle_hash(info)
    (Path(folder) / MODEL_JSON).write_text(json.dumps(info, indent=2) + "\n")
