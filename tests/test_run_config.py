"""The training run's configuration: presets, round trips, overrides, and bad values refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mocoplus.config import MoCoConfig
from pipeline.data.augment import PRESETS as AUGMENT_PRESETS
from pipeline.train.run_config import (
    PRESET_DIR,
    DataConfig,
    EvalConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_override,
    preset_names,
    read_config_file,
    with_data,
)

PRESETS = preset_names()


# --- presets ---------------------------------------------------------------------------------------------------------


def test_preset_names_are_the_shipped_toml_files():
    assert sorted(path.stem for path in PRESET_DIR.glob("*.toml")) == PRESETS
    assert {"cifar-resnet18", "imagenet-resnet50", "fashion-mnist-cpu"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    config = load_config(name)
    assert isinstance(config, RunConfig)
    assert isinstance(config.model, MoCoConfig)
    assert isinstance(config.data, DataConfig)
    assert isinstance(config.optim, OptimConfig)
    assert isinstance(config.train, TrainConfig)
    assert isinstance(config.eval, EvalConfig)
    # every key the file sets is what the config holds (nothing silently dropped or renamed)
    for section, values in read_config_file(name).items():
        for key, value in values.items():
            held = config.augmentation if section == "augment" else getattr(config, section)
            expected = tuple(value) if isinstance(value, list) else value
            assert getattr(held, key) == expected, f"{name}: {section}.{key}"
    # a preset named by its path loads the same
    assert load_config(PRESET_DIR / f"{name}.toml") == config
    assert load_config(str(PRESET_DIR / f"{name}.toml")) == config


def test_cifar_preset_is_the_moco_cifar_demo_recipe():
    config = load_config("cifar-resnet18")
    assert config.model.arch == "resnet18"
    assert config.model.cifar_stem is True
    assert config.model.queue_size == 4096
    assert config.model.momentum == 0.99
    assert config.model.temperature == 0.1
    assert config.model.dual_view == "none"
    assert config.model.negatives == "all"
    assert config.optim.optimizer == "sgd"
    assert config.optim.lr == 0.06
    assert config.optim.weight_decay == 5e-4
    assert config.optim.schedule == "cosine"
    assert config.train.global_batch == 512
    assert config.train.epochs == 200
    assert config.data.augment == "colour-32"
    assert config.data.image_size == 32
    assert config.lr == pytest.approx(0.06)  # lr is given at batch 512, the preset's batch


def test_imagenet_preset_is_the_moco_v2_recipe():
    config = load_config("imagenet-resnet50")
    assert config.model.arch == "resnet50"
    assert config.model.cifar_stem is False
    assert config.model.queue_size == 65536
    assert config.model.momentum == 0.999
    assert config.model.temperature == 0.2
    assert config.optim.lr == 0.03
    assert config.optim.base_batch == 256
    assert config.optim.weight_decay == 1e-4
    assert config.train.global_batch == 256
    assert config.train.epochs == 200
    assert config.data.augment == "colour-224"
    assert config.data.image_size == 224
    assert config.lr == pytest.approx(0.03)


def test_photos_preset_is_the_cpu_recipe_on_64_px_colour_crops():
    config, gray = load_config("photos-cpu"), load_config("fashion-mnist-cpu")
    assert config.augmentation.input_mode == "RGB" and config.augmentation.grayscale_p == 0.2
    assert config.augmentation.output_size == config.data.image_size == 64
    assert config.augmentation.jitter_p == 0.8 and config.augmentation.saturation > 0
    embedding = {"embedding_grid": 1, "embedding_whitening": "none", "embedding_dims": None}
    assert config.model == replace(gray.model, **embedding)  # the gray preset's network and objective
    assert config.train.time_budget == 900 and config.train.global_batch == 64


def test_augment_overrides_apply_on_top_of_the_preset_at_the_data_image_size():
    overrides = ["augment.scale=[0.6, 1]", "augment.brightness=0.2", "data.image_size=32"]
    config = load_config("fashion-mnist-cpu", overrides)
    preset = AUGMENT_PRESETS[config.data.augment]()
    assert config.augmentation == replace(preset, output_size=32, scale=(0.6, 1.0), brightness=0.2, blur_p=0.0)
    shipped = load_config("fashion-mnist-cpu").augmentation
    assert shipped == replace(preset, output_size=28, scale=(0.6, 1.0), blur_p=0.0)
    assert load_config("cifar-resnet18").augmentation == replace(AUGMENT_PRESETS["colour-32"](), output_size=32)


def test_augment_output_size_is_refused_pointing_at_data_image_size():
    assert "data.image_size" in error_of(["augment.output_size=28"])


def test_unknown_augment_field_suggests_the_close_one():
    assert "augment.scale" in error_of(["augment.sclae=[0.5, 1.0]"])


def test_no_spec_gives_the_defaults():
    assert load_config() == RunConfig()
    assert load_config(None, ["train.epochs=3"]) == RunConfig(train=TrainConfig(epochs=3))


# --- round trips -----------------------------------------------------------------------------------------------------

OVERRIDDEN = [
    pytest.param([], id="plain"),
    pytest.param(["train.epochs=3", "optim.lr=0.1", "train.compile=true"], id="train-optim"),
    pytest.param(["model.negatives=topk", "model.num_negatives=64", "model.hidden_dim=512"], id="topk-hidden"),
    pytest.param(["model.negatives=threshold", "model.negative_threshold=0.5"], id="threshold"),
    pytest.param(["augment.scale=[0.4, 1.0]", "augment.blur_p=0", "augment.mean=[0.5, 0.5, 0.5]"], id="augment"),
    pytest.param(["optim.optimizer=lars", "optim.warmup_epochs=0.5", "data.train=shards/x y"], id="lars-path"),
]


@pytest.mark.parametrize("overrides", OVERRIDDEN)
@pytest.mark.parametrize("name", PRESETS)
def test_to_dict_round_trips_through_dict_and_json(tmp_path, name, overrides):
    config = load_config(name, overrides)
    assert config_from_dict(config.to_dict()) == config
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict(), indent=2))
    assert load_config(path) == config
    assert load_config(str(path)) == config


def test_overrides_apply_on_top_of_a_saved_json_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(load_config("cifar-resnet18").to_dict()))
    config = load_config(path, ["train.epochs=7"])
    assert config.train.epochs == 7
    assert config.model.queue_size == 4096


def test_a_toml_file_path_loads(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '[model]\narch = "resnet34"\nqueue_size = 1024\nnegatives = "band"\nnum_negatives = 100\nskip_negatives = 4\n'
        "\n[optim]\nlr = 0.5\nwarmup_epochs = 2\n\n[train]\nepochs = 12\nglobal_batch = 64\ncompile = true\n"
        '\n[data]\ntrain = "shards/train"\n'
    )
    config = load_config(path)
    assert config.model == MoCoConfig(
        arch="resnet34", queue_size=1024, negatives="band", num_negatives=100, skip_negatives=4
    )
    assert config.optim == OptimConfig(lr=0.5, warmup_epochs=2.0)
    assert config.train == TrainConfig(epochs=12, global_batch=64, compile=True)
    assert config.data.train == "shards/train"
    assert config_from_dict(config.to_dict()) == config


def test_with_data_replaces_only_data_fields():
    config = load_config("cifar-resnet18")
    changed = with_data(config, train="a", eval_queries="b")
    assert changed.data.train == "a" and changed.data.eval_queries == "b"
    assert changed.data.augment == config.data.augment
    assert changed.model == config.model and changed.optim == config.optim and changed.train == config.train
    assert config.data.train == ""  # the original is untouched (frozen)


# --- overrides -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.epochs=3", ("train", "epochs", 3)),
        ("optim.lr=0.1", ("optim", "lr", 0.1)),
        ("train.compile=true", ("train", "compile", True)),
        ("train.compile=false", ("train", "compile", False)),
        ('model.negatives="topk"', ("model", "negatives", "topk")),
        ("model.negatives=topk", ("model", "negatives", "topk")),
        (" train.epochs = 3 ", ("train", "epochs", 3)),
        ("data.train=shards/fmnist train", ("data", "train", "shards/fmnist train")),
        ("data.train=a=b", ("data", "train", "a=b")),
        ("optim.weight_decay=1e-4", ("optim", "weight_decay", 1e-4)),
    ],
)
def test_parse_override_reads_toml_values_else_plain_strings(text, expected):
    got = parse_override(text)
    assert got == expected
    assert type(got[2]) is type(expected[2])


def test_overrides_give_typed_values():
    config = load_config(
        "cifar-resnet18",
        ["train.epochs=3", "optim.lr=0.1", "train.compile=true", "model.negatives=topk", "model.num_negatives=32"],
    )
    assert config.train.epochs == 3 and type(config.train.epochs) is int
    assert config.optim.lr == 0.1 and type(config.optim.lr) is float
    assert config.train.compile is True
    assert config.model.negatives == "topk" and config.model.num_negatives == 32
    quoted = load_config("cifar-resnet18", ['model.negatives="topk"', "model.num_negatives=32"])
    assert quoted.model == config.model


def test_an_int_for_a_float_field_is_accepted_as_float():
    config = load_config(
        None, ["optim.lr=1", "model.width=2", "model.negatives=threshold", "model.negative_threshold=0"]
    )
    assert config.optim.lr == 1.0 and type(config.optim.lr) is float
    assert config.model.width == 2.0 and type(config.model.width) is float
    assert config.model.negative_threshold == 0.0 and type(config.model.negative_threshold) is float


def test_later_overrides_win():
    assert load_config("cifar-resnet18", ["train.epochs=3", "train.epochs=5"]).train.epochs == 5


@pytest.mark.parametrize(("global_batch", "base_batch", "lr"), [(256, 256, 0.03), (512, 256, 0.03), (64, 256, 0.1)])
def test_lr_scales_linearly_with_the_global_batch(global_batch, base_batch, lr):
    config = load_config(
        None,
        [f"train.global_batch={global_batch}", f"optim.base_batch={base_batch}", f"optim.lr={lr}"],
    )
    assert config.lr == pytest.approx(lr * global_batch / base_batch, rel=1e-12)


def test_lr_of_the_cifar_preset_doubles_with_the_batch():
    base = load_config("cifar-resnet18")
    doubled = load_config("cifar-resnet18", ["train.global_batch=1024"])
    assert doubled.lr == pytest.approx(2 * base.lr, rel=1e-12)
    assert doubled.optim.lr == base.optim.lr  # the configured rate is untouched; only the used one scales


# --- bad values ------------------------------------------------------------------------------------------------------


def error_of(overrides: list[str], spec: str | None = "cifar-resnet18") -> str:
    with pytest.raises(ValueError) as caught:  # noqa: PT011 (the message is checked by the callers)
        load_config(spec, overrides)
    return str(caught.value)


def test_unknown_field_names_it_and_suggests_the_close_one():
    message = error_of(["train.epoch=3"])
    assert "train.epoch" in message
    assert "did you mean train.epochs?" in message


def test_unknown_field_without_a_close_match_still_names_it():
    message = error_of(["optim.zzzzzz=1"])
    assert "optim.zzzzzz" in message
    assert "did you mean" not in message


def test_unknown_section_names_it_and_suggests_the_close_one():
    message = error_of(["trian.epochs=3"])
    assert "'trian'" in message
    assert "did you mean 'train'?" in message


def test_unknown_field_in_a_file_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nqueue_sise = 10\n")
    with pytest.raises(ValueError, match=r"model\.queue_sise.*did you mean model\.queue_size"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        pytest.param('train.epochs="3"', "train.epochs", id="string-for-int"),
        pytest.param("train.epochs=three", "train.epochs", id="bare-word-for-int"),
        pytest.param("train.epochs=3.0", "train.epochs", id="float-for-int"),
        pytest.param("train.epochs=3.5", "train.epochs", id="fraction-for-int"),
        pytest.param("train.compile=1", "train.compile", id="int-for-bool"),
        pytest.param('train.compile="true"', "train.compile", id="string-for-bool"),
        pytest.param("train.epochs=true", "train.epochs", id="bool-for-int"),
        pytest.param("optim.lr=true", "optim.lr", id="bool-for-float"),
        pytest.param("optim.lr=fast", "optim.lr", id="string-for-float"),
        pytest.param("model.hidden_dim=true", "model.hidden_dim", id="bool-for-optional-int"),
        pytest.param("model.hidden_dim=1.5", "model.hidden_dim", id="float-for-optional-int"),
        pytest.param("data.train=3", "data.train", id="int-for-string"),
        pytest.param("data.train=[1, 2]", "data.train", id="list-for-string"),
        pytest.param("optim.optimizer=adam", "optim.optimizer", id="not-a-choice"),
    ],
)
def test_wrong_type_names_the_field(override, field):
    assert field in error_of([override])


@pytest.mark.parametrize(
    ("override", "section", "key"),
    [
        pytest.param("optim.lr=-0.1", "optim", "lr", id="negative-lr"),
        pytest.param("optim.lr=0", "optim", "lr", id="zero-lr"),
        pytest.param("optim.momentum=1", "optim", "momentum", id="momentum-1"),
        pytest.param("optim.warmup_epochs=-1", "optim", "warmup_epochs", id="negative-warmup"),
        pytest.param("train.epochs=0", "train", "epochs", id="zero-epochs"),
        pytest.param("train.keep_last=0", "train", "keep_last", id="keep-nothing"),
        pytest.param("train.precision=fp8", "train", "precision", id="precision"),
        pytest.param("model.negatives=hardest", "model", "negatives", id="negatives-mode"),
        pytest.param("model.temperature=0", "model", "temperature", id="zero-temperature"),
        pytest.param("model.momentum=1.5", "model", "momentum", id="key-momentum"),
        pytest.param("data.augment=fancy", "data", "augment", id="augment"),
        pytest.param("augment.scale=[0.9, 0.2]", "augment", "scale", id="augment-scale"),
        pytest.param("augment.flip_p=2", "augment", "probabilities", id="augment-probability"),
        pytest.param("augment.mean=[0.5]", "augment", "mean", id="augment-channels"),
        pytest.param("data.image_size=4", "data", "image_size", id="image-size"),
        pytest.param("eval.knn_k=0", "eval", "knn_k", id="knn-k"),
    ],
)
def test_out_of_range_value_names_section_and_field(override, section, key):
    message = error_of([override])
    assert section in message
    assert key in message


def test_topk_negatives_without_k_is_refused():
    assert "needs num_negatives" in error_of(["model.negatives=topk"], spec=None)


@pytest.mark.parametrize("override", ["optim.lr=nan", "model.temperature=nan", "eval.knn_temperature=nan"])
def test_nan_for_a_positive_float_is_refused(override):
    with pytest.raises(ValueError, match=override.split("=")[0].split(".")[1]):
        load_config(None, [override])


@pytest.mark.parametrize(
    "text",
    ["train.epochs", "epochs=3", "=3", "train.=3", ".epochs=3", "", "train epochs 3"],
)
def test_malformed_override_text_is_a_value_error(text):
    with pytest.raises(ValueError, match=r"section\.field=value"):
        parse_override(text)
    with pytest.raises(ValueError, match=r"section\.field=value"):
        load_config(None, [text])


def test_override_of_a_section_that_is_not_a_table(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train": 3}))
    with pytest.raises(ValueError, match="'train'"):
        load_config(path, ["train.epochs=3"])
    with pytest.raises(ValueError, match="'train'"):
        load_config(path)


def test_config_from_dict_refuses_a_non_table():
    with pytest.raises(ValueError, match="table"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


def test_global_batch_must_be_a_multiple_of_bn_splits():
    message = error_of(["train.global_batch=100", "model.bn_splits=8"])
    assert "train.global_batch" in message and "model.bn_splits" in message
    # 128 is a multiple of 8, and shuffle BN has no such constraint
    assert load_config("cifar-resnet18", ["train.global_batch=128"]).train.global_batch == 128
    assert load_config(None, ["train.global_batch=100", "model.key_bn=shuffle"]).train.global_batch == 100


@pytest.mark.parametrize("spec", ["cifar-resnet19", "no/such/file.toml", "missing.json"])
def test_missing_file_or_unknown_preset_lists_the_presets(spec):
    with pytest.raises(FileNotFoundError) as caught:
        load_config(spec)
    message = str(caught.value)
    assert spec in message
    for name in PRESETS:
        assert name in message


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "kind"),
    [
        pytest.param("bad.toml", b"[model\narch = ", "TOML", id="toml"),
        pytest.param("bad.toml", b"[model]\narch = resnet18\n", "TOML", id="toml-bare-value"),
        pytest.param("bad.json", b'{"model": {"arch": ', "JSON", id="json"),
        pytest.param("bad.json", b"", "JSON", id="empty-json"),
        pytest.param("bad.toml", b"\xff\xfe\x00garbage\x80", "TOML", id="binary-toml"),
        pytest.param("bad.json", b"\xff\xfe\x00garbage\x80", "JSON", id="binary-json"),
    ],
)
def test_invalid_file_is_a_value_error_naming_it(tmp_path, name, content, kind):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as caught:  # noqa: PT011
        load_config(path)
    assert str(path) in str(caught.value)
    assert kind in str(caught.value)
