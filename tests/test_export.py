"""Export: a small trained run on real Fashion-MNIST shards → TorchScript + ONNX bundle, and its loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import SMALL_EXPORT as SMALL
from test_train import tiny_config
from torch.nn import functional as F
from typer.testing import CliRunner

from artifacts.atomic import TEMP_PREFIX, sha256_file
from artifacts.model_bundle import MODEL_JSON, ONNX_FILE, TORCHSCRIPT_FILE, BundleError, ModelBundle, bundle_hash
from flows.cli.main import app
from pipeline.data.augment import eval_transform
from pipeline.data.streams import EvalStream, StreamConfig
from pipeline.export.config import ExportConfig
from pipeline.export.export import EmbeddingModel, ExportError, export, parity_images, whitening_dims
from pipeline.train.checkpoints import load_run


@pytest.fixture(scope="module")
def images(fashion_test_shards) -> np.ndarray:
    return parity_images(str(fashion_test_shards), 28, 64)


def read_info(bundle: Path) -> dict:
    return json.loads((bundle / MODEL_JSON).read_text())


def test_bundle_holds_one_onnx_file_torchscript_and_model_json(bundle):
    assert sorted(path.name for path in bundle.iterdir()) == sorted([ONNX_FILE, TORCHSCRIPT_FILE, MODEL_JSON])
    onnx.checker.check_model(str(bundle / ONNX_FILE), full_check=True)
    model = onnx.load(str(bundle / ONNX_FILE))
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert oct(bundle.stat().st_mode & 0o777) == oct(0o755)


def test_model_json_states_the_contract_the_source_and_the_parity(bundle, trained_run):
    info = read_info(bundle)
    assert info["input"]["name"] == "images" and info["input"]["dtype"] == "uint8"
    assert info["input"]["layout"] == "NHWC" and info["input"]["shape"] == ["N", 28, 28, 3]
    assert info["input"]["resize"]["policy"] == "shorter-side-then-centre-crop"
    assert info["output"] == {"name": "embedding", "dtype": "float32", "dim": 64, "normalized": "l2"}
    assert (info["encoder"], info["head"], info["opset"]) == ("key", "none", 18)
    checkpoint = Path(info["source"]["checkpoint"])
    assert checkpoint.parent == trained_run / "checkpoints"
    assert info["source"]["checkpoint_sha256"] == sha256_file(checkpoint)
    assert info["files"][ONNX_FILE] == sha256_file(bundle / ONNX_FILE)
    assert info["bundle_hash"] == bundle_hash(info)
    parity = info["parity"]
    assert parity["images"] == 64 and parity["batch_sizes"] == [1, 7, 64]
    assert 0 <= parity["onnxruntime_max_abs_diff"] <= 1e-4 and 0 <= parity["torchscript_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("batch_size", [1, 7])
def test_eager_torchscript_and_onnx_runtime_agree(bundle, trained_run, images, batch_size):
    model, _, _ = load_run(trained_run)
    config = tiny_config(Path("unused"))
    eager = EmbeddingModel(model.key_encoder, config.augmentation, projection=False).eval()
    scripted = torch.jit.load(str(bundle / TORCHSCRIPT_FILE))
    loaded = ModelBundle(bundle)
    batch = images[:batch_size]
    with torch.no_grad():
        reference = eager(torch.from_numpy(batch)).numpy()
        traced = scripted(torch.from_numpy(batch)).numpy()
    onnx_out = loaded.embed(batch)
    assert onnx_out.shape == (batch_size, 64) and onnx_out.dtype == np.float32
    np.testing.assert_allclose(traced, reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_out, reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(onnx_out, axis=1), 1.0, atol=1e-5)


def test_in_graph_preprocessing_matches_the_training_evaluation_path(bundle, trained_run, fashion_test_shards):
    """Naive reference: gray decode → eval_transform → key backbone → L2 normalise, as the kNN monitor does."""
    model, _, _ = load_run(trained_run)
    config = tiny_config(Path("unused"))
    stream = EvalStream(str(fashion_test_shards), 28, "L", StreamConfig(batch_size=16, workers=0), rank=0, world_size=1)
    gray = next(iter(stream)).images  # uint8 [16, 1, 28, 28]
    with torch.no_grad():
        reference = F.normalize(model.key_encoder.backbone(eval_transform(gray, config.augmentation)), dim=1)
    rgb = gray.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    np.testing.assert_allclose(ModelBundle(bundle).embed(rgb), reference.numpy(), atol=1e-4, rtol=0)


def test_two_exports_of_one_checkpoint_have_the_same_hash(bundle, trained_run, tmp_path):
    export(trained_run, tmp_path / "again", SMALL)
    first, second = read_info(bundle), read_info(tmp_path / "again")
    assert second["bundle_hash"] == first["bundle_hash"]
    assert second["files"][ONNX_FILE] == first["files"][ONNX_FILE]
    for info in (first, second):
        info.pop("created")
        info["files"].pop(TORCHSCRIPT_FILE)  # TorchScript mangles class names per process: not hashed
    assert first == second


def test_query_encoder_and_projection_head_are_exported_on_request(bundle, trained_run, tmp_path, images):
    export(trained_run, tmp_path / "query", ExportConfig(parity_images=64, encoder="query", head="projection"))
    info = read_info(tmp_path / "query")
    assert (info["encoder"], info["head"], info["output"]["dim"]) == ("query", "projection", 32)
    assert info["bundle_hash"] != read_info(bundle)["bundle_hash"]
    assert ModelBundle(tmp_path / "query").embed(images[:3]).shape == (3, 32)


def test_a_grid_pooled_embedding_is_exported_with_its_dimension_and_parity(bundle, trained_run, tmp_path, images):
    export(trained_run, tmp_path / "grid", ExportConfig(parity_images=64, grid=2))
    info = read_info(tmp_path / "grid")
    assert (info["embedding_grid"], info["output"]["dim"]) == (2, 4 * read_info(bundle)["output"]["dim"])
    assert info["parity"]["onnxruntime_max_abs_diff"] <= 1e-4
    assert ModelBundle(tmp_path / "grid").embed(images[:3]).shape == (3, info["output"]["dim"])
    with pytest.raises(ValueError, match="projection head takes globally pooled"):
        export(trained_run, tmp_path / "bad", ExportConfig(parity_images=64, head="projection", grid=2))


@pytest.mark.parametrize("dims", [None, 24])
def test_a_whitened_embedding_matches_a_naive_pca_whitening_of_the_training_features(
    bundle, trained_run, fashion_shards, tmp_path, images, dims
):
    """Naive reference: eager features of all training images → numpy covariance and eigh → whiten (the leading
    ``dims`` directions: --dims) → normalise."""
    export(trained_run, tmp_path / "white", ExportConfig(parity_images=64, grid=2, whiten=True, dims=dims))
    info = read_info(tmp_path / "white")
    assert info["whitening"]["method"] == "pca" and info["whitening"]["images"] == 600
    assert info["whitening"]["dims"] == (dims or 1024)  # None: the run's model.embedding_dims (the preset's)
    assert info["whitening"]["fitted_on"] == str(fashion_shards)
    assert info["parity"]["onnxruntime_max_abs_diff"] <= 1e-4
    assert read_info(bundle)["whitening"] is None
    model, _, _ = load_run(trained_run)
    eager = EmbeddingModel(model.key_encoder, tiny_config(Path("unused")).augmentation, projection=False, grid=2)
    with torch.no_grad():
        train_features = eager.eval().features(torch.from_numpy(parity_images(str(fashion_shards), 28, 10_000)))
        query_features = eager.features(torch.from_numpy(images)).double().numpy()
    bank = train_features.double().numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(bank, rowvar=False, bias=True))
    kept = eigenvalues > 1e-6 * eigenvalues.max()
    if dims is not None:
        kept &= eigenvalues >= np.sort(eigenvalues)[-dims]  # the leading directions only
    whitened = (query_features - bank.mean(axis=0)) @ eigenvectors[:, kept] / np.sqrt(eigenvalues[kept])
    reference = whitened / np.linalg.norm(whitened, axis=1, keepdims=True)
    ours = ModelBundle(tmp_path / "white").embed(images)
    assert ours.shape == (len(images), int(kept.sum())) == (len(images), info["output"]["dim"])
    np.testing.assert_allclose(ours @ ours.T, reference @ reference.T, atol=2e-3)  # eigenvector signs are free
    with pytest.raises(ValueError, match="head none"):
        ExportConfig(whiten=True, head="projection")


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        pytest.param(np.zeros((2, 28, 28, 3), np.float32), "uint8", id="float"),
        pytest.param(np.zeros((2, 3, 28, 28), np.uint8), "[N, 28, 28, 3]", id="NCHW"),
        pytest.param(np.zeros((2, 28, 28), np.uint8), "[N, 28, 28, 3]", id="no-channel-axis"),
        pytest.param(np.zeros((2, 32, 32, 3), np.uint8), "[N, 28, 28, 3]", id="wrong-size"),
        pytest.param(np.zeros((0, 28, 28, 3), np.uint8), "N >= 1", id="empty"),
        pytest.param([[0]], "uint8", id="not-an-array"),
    ],
)
def test_loader_rejects_input_outside_the_contract(bundle, batch, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ModelBundle(bundle).embed(batch)


def copy_bundle(bundle: Path, target: Path) -> Path:
    target.mkdir()
    for path in bundle.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_loader_refuses_a_model_json_that_does_not_match_the_graph(bundle, tmp_path):
    edited = copy_bundle(bundle, tmp_path / "edited")
    info = read_info(edited)
    info["output"]["dim"] = 65
    (edited / MODEL_JSON).write_text(json.dumps(info))
    with pytest.raises(BundleError, match="bundle_hash does not match"):
        ModelBundle(edited)
    info["bundle_hash"] = bundle_hash(info)  # a consistent hash, but the graph still says 64
    (edited / MODEL_JSON).write_text(json.dumps(info))
    with pytest.raises(BundleError, match="output dim 64"):
        ModelBundle(edited)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(lambda b: (b / MODEL_JSON).unlink(), "no model.json", id="no-model-json"),
        pytest.param(lambda b: (b / MODEL_JSON).write_text("{not json"), "not valid JSON", id="bad-json"),
        pytest.param(lambda b: (b / ONNX_FILE).unlink(), "no encoder.onnx", id="no-onnx"),
        pytest.param(
            lambda b: (b / ONNX_FILE).write_bytes((b / ONNX_FILE).read_bytes()[:5000]), "cannot load", id="truncated"
        ),
    ],
)
def test_loader_reports_a_damaged_bundle_in_one_line(bundle, tmp_path, damage, message):
    damaged = copy_bundle(bundle, tmp_path / "damaged")
    damage(damaged)
    with pytest.raises(BundleError, match=message):
        ModelBundle(damaged)


def test_cuda_provider_is_a_hard_error_where_onnx_runtime_lacks_it(bundle):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    with pytest.raises(BundleError, match="cuda"):
        ModelBundle(bundle, provider="cuda")


def test_serving_loader_works_where_torch_cannot_be_imported(bundle, images, tmp_path):
    np.save(tmp_path / "images.npy", images[:5])
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from artifacts.model_bundle import ModelBundle\n"
        f"out = ModelBundle({str(bundle)!r}).embed(np.load({str(tmp_path / 'images.npy')!r}))\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print(out.shape)\n"
    )
    root = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(5, 64)"


# --- bad input: one clear error, nothing left behind --------------------------------------------------------------


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(TEMP_PREFIX))


def test_failed_parity_leaves_no_bundle_and_no_temp_folder(trained_run, tmp_path):
    with pytest.raises(ExportError, match="parity"):
        export(trained_run, tmp_path / "model", ExportConfig(parity_images=64, tolerance=1e-12))
    assert not (tmp_path / "model").exists()
    assert leftovers(tmp_path) == []


def test_missing_run_corrupt_checkpoint_and_used_output_are_clear_errors(trained_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        export(tmp_path / "nope", tmp_path / "a", SMALL)
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "checkpoints" / "step-000001.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        export(broken, tmp_path / "b", ExportConfig(checkpoint=str(broken / "checkpoints" / "step-000001.pt")))
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export(trained_run, used, SMALL)
    assert (used / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_is_a_clear_error(trained_run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(PermissionError):
        export(trained_run, locked / "model", SMALL)


def test_cli_exports_and_reports_errors_in_one_line(trained_run, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "m"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["bundle_hash"] == read_info(tmp_path / "m")["bundle_hash"]
    bad = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "n")])
    assert bad.exit_code == 1
    assert bad.output.strip().startswith("error:") and len(bad.output.strip().splitlines()) == 1
    wrong = runner.invoke(app, ["export", str(trained_run), "--out", str(tmp_path / "w"), "--encoder", "value"])
    assert wrong.exit_code == 1 and "encoder" in wrong.output


# --- int8 --------------------------------------------------------------------------------------------------------


def test_int8_export_is_a_quantized_graph_close_to_fp32(bundle, trained_run, tmp_path, images):
    export(trained_run, tmp_path / "int8", ExportConfig(parity_images=64, quantize="int8", calibration_images=96))
    info = read_info(tmp_path / "int8")
    assert info["precision"] == "int8-static-qdq" and info["quantization"]["calibration_images"] == 96
    assert info["parity"]["onnxruntime_mean_cosine"] >= 0.99
    assert info["parity"]["torchscript_max_abs_diff"] <= 1e-4  # TorchScript stays fp32
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8" / ONNX_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert info["bundle_hash"] != read_info(bundle)["bundle_hash"]
    quantized, reference = ModelBundle(tmp_path / "int8").embed(images), ModelBundle(bundle).embed(images)
    assert quantized.shape == reference.shape
    assert float((quantized * reference).sum(axis=1).mean()) >= 0.99
    files = sorted(path.name for path in (tmp_path / "int8").iterdir())
    assert files == sorted([ONNX_FILE, TORCHSCRIPT_FILE, MODEL_JSON])


def test_int8_below_the_cosine_floor_fails_and_leaves_nothing(trained_run, tmp_path):
    config = ExportConfig(parity_images=64, quantize="int8", calibration_images=64, min_cosine=1.0)
    with pytest.raises(ExportError, match="int8 parity check failed"):
        export(trained_run, tmp_path / "int8", config)
    assert not (tmp_path / "int8").exists() and leftovers(tmp_path) == []


def test_int8_keeps_a_reduced_whitening(trained_run, tmp_path):
    """A whitened int8 bundle keeps the leading 256 directions by default (or --dims), never all of them."""
    assert whitening_dims(ExportConfig(quantize="int8"), 1024) == 256
    assert whitening_dims(ExportConfig(quantize="int8"), None) == 256
    assert whitening_dims(ExportConfig(quantize="int8"), 128) == 128
    assert whitening_dims(ExportConfig(quantize="int8", dims=512), 1024) == 512
    assert whitening_dims(ExportConfig(), 1024) == 1024 and whitening_dims(ExportConfig(), None) is None
    # the tiny 4-step network is far from the demo's: its int8 features keep 0.99 through 16 directions
    config = ExportConfig(parity_images=64, quantize="int8", calibration_images=96, whiten=True, grid=4, dims=16)
    export(trained_run, tmp_path / "int8", config)
    info = read_info(tmp_path / "int8")
    assert info["whitening"]["dims"] == 16 and info["output"]["dim"] == 16 < info["whitening"]["input_dim"]
    assert info["parity"]["onnxruntime_mean_cosine"] >= 0.99


def test_int8_without_dims_falls_back_to_the_widest_whitening_that_keeps_the_cosine_floor(trained_run, tmp_path):
    """The tiny 4-step network's int8 features measure 0.971 with 256 whitened directions, 0.979 with 128 and
    0.986 with 64: below a 0.99 floor all three are refused and the error names each; above a 0.975 floor the
    bundle keeps 128 and model.json says what was refused, with its measured cosine."""
    config = ExportConfig(parity_images=64, quantize="int8", calibration_images=96, whiten=True, grid=4)
    with pytest.raises(ExportError, match=r"with the whitening's 64 directions \(0\.9\d+ with 256, 0\.9\d+ with 128\)"):
        export(trained_run, tmp_path / "strict", config)
    assert not (tmp_path / "strict").exists()
    export(trained_run, tmp_path / "int8", replace(config, min_cosine=0.975))
    info = read_info(tmp_path / "int8")
    refused = info["whitening"]["int8_refused"]
    assert [entry["dims"] for entry in refused] == [256] and refused[0]["mean_cosine"] < 0.975
    assert info["output"]["dim"] == info["whitening"]["dims"] == 128
    assert info["parity"]["onnxruntime_mean_cosine"] >= 0.975
