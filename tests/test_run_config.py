"""The training run's configuration, optimizer, schedule and checkpoints: presets, overrides, hostile inputs."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import pickle
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from mocoplus.config import MoCoConfig
from pipeline.data.augment import PRESETS as AUGMENT_PRESETS
from pipeline.train.checkpoints import (
    checkpoint_dir,
    load_checkpoint,
    mark_best,
    resolve_checkpoint,
    save_checkpoint,
)
from pipeline.train.optim import LARS, build_optimizer, build_scheduler, lr_multiplier, parameter_groups
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
    assert "k" in error_of(["model.negatives=topk"], spec=None)


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


# --- the learning-rate schedule ---------------------------------------------------------------------------------------


def naive_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / (total - warmup), 1.0)
    return (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (100, 0), (37, 5), (10, 1)])
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_multiplier_matches_the_naive_formula(total, warmup, schedule):
    for step in range(total + 3):
        assert lr_multiplier(step, total, warmup, schedule) == pytest.approx(
            naive_multiplier(step, total, warmup, schedule), abs=1e-12
        ), step


def test_warmup_is_linear_and_reaches_one_at_its_last_step():
    warmup = 8
    values = [lr_multiplier(step, 100, warmup, "cosine") for step in range(warmup)]
    assert values[0] == pytest.approx(1 / warmup)
    assert values[-1] == pytest.approx(1.0)
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert steps == pytest.approx([1 / warmup] * (warmup - 1))
    assert lr_multiplier(warmup, 100, warmup, "cosine") == pytest.approx(1.0)  # the cosine starts at its top


def test_cosine_decays_monotonically_to_zero():
    total, warmup = 50, 5
    values = [lr_multiplier(step, total, warmup, "cosine") for step in range(warmup, total + 1)]
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(0.0, abs=1e-12)
    midpoint = warmup + (total - warmup) / 2
    assert lr_multiplier(int(midpoint), total, warmup, "cosine") == pytest.approx(
        naive_multiplier(int(midpoint), total, warmup, "cosine")
    )
    assert lr_multiplier(total + 10, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_stays_one_after_warmup():
    assert [lr_multiplier(step, 20, 0, "constant") for step in range(25)] == [1.0] * 25
    assert [lr_multiplier(step, 20, 4, "constant") for step in range(4, 25)] == [1.0] * 21


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_scheduler_sets_base_lr_times_the_multiplier(schedule):
    config = load_config(
        None,
        [
            "optim.lr=0.2",
            "optim.base_batch=128",
            "train.global_batch=256",
            "optim.warmup_epochs=0.5",
            f"optim.schedule={schedule}",
        ],
    )
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=config.lr, momentum=0.9)
    steps_per_epoch, total = 8, 24
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=steps_per_epoch, total_steps=total)
    warmup = 4  # 0.5 epochs × 8 steps
    for k in range(total + 2):
        expected = 0.4 * naive_multiplier(k, total, warmup, schedule)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), k
        weight.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()


def test_scheduler_state_resumes_at_the_same_lr():
    config = load_config(None, ["optim.warmup_epochs=1"])
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5, total_steps=30)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()

    other = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=config.lr)
    resumed = build_scheduler(other, config, steps_per_epoch=5, total_steps=30)
    other.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(state)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        other.step()
        resumed.step()
        assert other.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-15)


# --- parameter groups and optimizers ----------------------------------------------------------------------------------


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
        nn.LayerNorm(5),
    )


def test_parameter_groups_split_weights_from_biases_and_norms():
    model = small_net()
    groups = parameter_groups(model, weight_decay=1e-3)
    decayed, plain = groups
    decayed_ids = {id(p) for p in decayed["params"]}
    plain_ids = {id(p) for p in plain["params"]}
    assert decayed_ids == {id(model[0].weight), id(model[4].weight)}
    assert plain_ids == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[4].bias),
        id(model[5].weight),
        id(model[5].bias),
    }
    assert decayed["weight_decay"] == 1e-3 and decayed.get("lars", True) is True
    assert plain["weight_decay"] == 0.0 and plain["lars"] is False
    assert all(p.ndim == 1 for p in plain["params"]) and all(p.ndim > 1 for p in decayed["params"])


def test_parameter_groups_skip_frozen_parameters():
    model = small_net()
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    grouped = {id(p) for group in parameter_groups(model, 0.1) for p in group["params"]}
    assert id(model[0].weight) not in grouped and id(model[1].bias) not in grouped
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_build_optimizer_uses_the_scaled_lr_and_the_groups(optimizer):
    config = load_config(
        None,
        [
            f"optim.optimizer={optimizer}",
            "optim.lr=0.1",
            "optim.base_batch=64",
            "train.global_batch=128",
            "optim.weight_decay=0.01",
            "optim.momentum=0.8",
            "optim.lars_trust=0.02",
        ],
    )
    built = build_optimizer(small_net(), config)
    assert isinstance(built, LARS if optimizer == "lars" else torch.optim.SGD)
    decayed, plain = built.param_groups
    for group in built.param_groups:
        assert group["lr"] == pytest.approx(0.2)
        assert group["momentum"] == 0.8
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    if optimizer == "lars":
        assert decayed["trust"] == 0.02
        assert decayed.get("lars", True) is True and plain["lars"] is False


def naive_lars(
    weights: list[torch.Tensor],
    grads_per_step: list[list[torch.Tensor]],
    *,
    adapt: list[bool],
    decay: list[float],
    lr: float,
    momentum: float,
    trust: float,
) -> list[torch.Tensor]:
    """LARS one tensor at a time in float64: g = ∇ + wd·w; g *= trust·‖w‖/‖g‖ (adapted, norms > 0); v = m·v + g."""
    weights = [w.double().clone() for w in weights]
    buffers: list[torch.Tensor | None] = [None] * len(weights)
    for grads in grads_per_step:
        for i, (w, grad) in enumerate(zip(weights, grads, strict=True)):
            g = grad.double() + decay[i] * w
            if adapt[i]:
                w_norm = math.sqrt(sum(float(x) ** 2 for x in w.flatten()))
                g_norm = math.sqrt(sum(float(x) ** 2 for x in g.flatten()))
                if w_norm > 0 and g_norm > 0:
                    g = g * (trust * w_norm / g_norm)
            buffers[i] = g.clone() if buffers[i] is None else momentum * buffers[i] + g
            weights[i] = w - lr * buffers[i]
    return weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lars_matches_a_naive_per_tensor_reference(generator, dtype):
    shapes = [(4, 3, 3, 3), (5, 16), (7,), (5,)]
    adapt = [True, True, False, False]
    decay = [0.01, 0.01, 0.0, 0.0]
    lr, momentum, trust = 0.5, 0.9, 0.02
    initial = [torch.randn(shape, generator=generator) for shape in shapes]
    grads_per_step = [[torch.randn(shape, generator=generator) * 3 for shape in shapes] for _ in range(5)]

    params = [nn.Parameter(w.clone().to(dtype)) for w in initial]
    optimizer = LARS(
        [
            {"params": params[:2], "weight_decay": decay[0]},
            {"params": params[2:], "weight_decay": 0.0, "lars": False},
        ],
        lr=lr,
        momentum=momentum,
        trust=trust,
    )
    for grads in grads_per_step:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.to(dtype)
        optimizer.step()

    expected = naive_lars(initial, grads_per_step, adapt=adapt, decay=decay, lr=lr, momentum=momentum, trust=trust)
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6)
    # the trust ratio actually did something: adapted tensors moved far less than a plain SGD step would
    plain_move = lr * grads_per_step[0][0].norm()
    assert (params[0].detach() - initial[0]).norm() < plain_move / 10


def test_lars_trust_ratio_makes_the_step_size_independent_of_the_gradient_scale(generator):
    weight = torch.randn(6, 4, generator=generator)
    grad = torch.randn(6, 4, generator=generator)
    moved = []
    for scale in (1e-3, 1.0, 1e3):
        param = nn.Parameter(weight.clone())
        optimizer = LARS([param], lr=1.0, momentum=0.0, trust=0.01)
        param.grad = grad * scale
        optimizer.step()
        moved.append(param.detach() - weight)
    for other in moved[1:]:
        torch.testing.assert_close(other, moved[0], rtol=1e-5, atol=1e-7)
    assert moved[0].norm() == pytest.approx(0.01 * weight.norm().item(), rel=1e-5)


def test_lars_zero_weight_takes_the_plain_gradient_step(generator):
    grad = torch.randn(3, 4, generator=generator)
    param = nn.Parameter(torch.zeros(3, 4))
    optimizer = LARS([param], lr=0.1, momentum=0.9, weight_decay=0.01, trust=0.001)
    param.grad = grad.clone()
    optimizer.step()
    torch.testing.assert_close(param.detach(), -0.1 * grad, rtol=0, atol=1e-7)


def test_lars_zero_gradient_leaves_the_weight_alone_and_skips_missing_grads(generator):
    weight = torch.randn(3, 4, generator=generator)
    zero_grad = nn.Parameter(weight.clone())
    no_grad = nn.Parameter(weight.clone())
    optimizer = LARS([zero_grad, no_grad], lr=0.1, momentum=0.9, trust=0.001)
    zero_grad.grad = torch.zeros(3, 4)
    optimizer.step()
    assert torch.equal(zero_grad.detach(), weight) and torch.isfinite(zero_grad).all()
    assert torch.equal(no_grad.detach(), weight)
    assert no_grad not in optimizer.state


def test_lars_state_dict_resumes_the_momentum(generator):
    shapes = [(4, 5), (5,)]
    initial = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(4)]

    def make(weights):
        params = [nn.Parameter(w.clone()) for w in weights]
        groups = [
            {"params": params[:1], "weight_decay": 0.1},
            {"params": params[1:], "weight_decay": 0.0, "lars": False},
        ]
        return params, LARS(groups, lr=0.3, momentum=0.9, trust=0.05)

    params, optimizer = make(initial)
    for step_grads in grads[:2]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    resumed_params, resumed = make([p.detach() for p in params])
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as a file would give it
    for step_grads in grads[2:]:
        for pair in ((params, optimizer), (resumed_params, resumed)):
            for p, g in zip(pair[0], step_grads, strict=True):
                p.grad = g.clone()
            pair[1].step()
    for a, b in zip(params, resumed_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- checkpoints -----------------------------------------------------------------------------------------------------


def checkpoint_state(step: int, epoch: int = 0) -> dict:
    return {
        "format": "mocoplus.checkpoint",
        "model": {"weight": torch.full((2, 3), float(step))},
        "step": step,
        "epoch": epoch,
        "config": RunConfig().to_dict(),
    }


def step_files(run: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir(run).iterdir() if p.name.startswith("step-"))


def test_save_keeps_the_newest_and_points_last_at_it(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30, 40, 50):
        path = save_checkpoint(run, checkpoint_state(step, epoch=step // 10), step, keep_last=2)
        assert path == checkpoint_dir(run) / f"step-{step:08d}.pt"
    assert step_files(run) == ["step-00000040.pt", "step-00000050.pt"]
    pointer = json.loads((checkpoint_dir(run) / "last.json").read_text())
    assert pointer == {"checkpoint": "step-00000050.pt", "step": 50, "epoch": 5}
    last = resolve_checkpoint(run, "last")
    assert last == checkpoint_dir(run) / "step-00000050.pt"
    state = load_checkpoint(last)
    assert state["step"] == 50 and torch.equal(state["model"]["weight"], torch.full((2, 3), 50.0))
    assert state["config"] == RunConfig().to_dict()
    assert not [p.name for p in checkpoint_dir(run).iterdir() if p.name.endswith(".tmp")]


def test_step_files_of_any_magnitude_prune_by_number(tmp_path):
    run = tmp_path / "run"
    for step in (9, 99, 100, 1000, 12345):
        save_checkpoint(run, checkpoint_state(step), step, keep_last=3)
    assert step_files(run) == ["step-00000100.pt", "step-00001000.pt", "step-00012345.pt"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, checkpoint_state(5), 5, keep_last=3)
    save_checkpoint(run, {**checkpoint_state(5), "epoch": 9}, 5, keep_last=3)
    assert step_files(run) == ["step-00000005.pt"]
    assert load_checkpoint(resolve_checkpoint(run))["epoch"] == 9


def test_best_survives_pruning(tmp_path):
    run = tmp_path / "run"
    first = save_checkpoint(run, checkpoint_state(1), 1, keep_last=1)
    mark_best(run, first, {"step": 1, "knn_top1": 0.42})
    for step in (2, 3, 4):
        save_checkpoint(run, checkpoint_state(step), step, keep_last=1)
    assert step_files(run) == ["step-00000004.pt"]
    assert not first.exists()
    best = resolve_checkpoint(run, "best")
    assert best == checkpoint_dir(run) / "best.pt"
    assert load_checkpoint(best)["step"] == 1
    assert json.loads((checkpoint_dir(run) / "best.json").read_text()) == {
        "checkpoint": "step-00000001.pt",
        "step": 1,
        "knn_top1": 0.42,
    }
    # a better one replaces it
    mark_best(run, checkpoint_dir(run) / "step-00000004.pt", {"step": 4, "knn_top1": 0.5})
    assert load_checkpoint(resolve_checkpoint(run, "best"))["step"] == 4
    assert not [p.name for p in checkpoint_dir(run).iterdir() if p.name.endswith(".tmp")]


def test_resolve_an_explicit_path(tmp_path):
    run = tmp_path / "run"
    path = save_checkpoint(run, checkpoint_state(3), 3, keep_last=2)
    assert resolve_checkpoint(run, str(path)) == path
    assert resolve_checkpoint(tmp_path / "elsewhere", str(path)) == path
    with pytest.raises(FileNotFoundError, match=re.escape("nope.pt")):
        resolve_checkpoint(run, str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(run, str(checkpoint_dir(run)))  # a folder is not a checkpoint


def test_no_checkpoints_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        resolve_checkpoint(tmp_path / "never-made", "last")
    checkpoint_dir(tmp_path / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        resolve_checkpoint(tmp_path / "empty", "last")


def test_missing_best_mentions_eval(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, checkpoint_state(1), 1, keep_last=2)
    with pytest.raises(FileNotFoundError, match="--eval"):
        resolve_checkpoint(run, "best")
    with pytest.raises(FileNotFoundError, match="--eval"):
        resolve_checkpoint(tmp_path / "never-made", "best")


def test_last_json_naming_a_deleted_file_is_file_not_found(tmp_path):
    run = tmp_path / "run"
    path = save_checkpoint(run, checkpoint_state(1), 1, keep_last=2)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("last.json")):
        resolve_checkpoint(run, "last")


@pytest.mark.parametrize("pointer", [None, "", "{not json", '{"step": 2}', "[1, 2]", '{"checkpoint": null}'])
def test_without_a_usable_last_json_the_newest_step_file_wins_not_a_temp_file(tmp_path, pointer):
    run = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(run, checkpoint_state(step), step, keep_last=5)
    folder = checkpoint_dir(run)
    # what an interrupted save of a later step leaves behind: a hidden temp file, half written
    (folder / ".step-00000009.pt.abc123.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    (folder / "step-00000007.pt.partial").write_bytes(b"junk")  # not a step file either
    (folder / "last.json").unlink()
    if pointer is not None:
        (folder / "last.json").write_text(pointer)
    newest = resolve_checkpoint(run, "last")
    assert newest == folder / "step-00000002.pt"
    assert load_checkpoint(newest)["step"] == 2


def test_pruning_ignores_temp_files_and_other_files(tmp_path):
    run = tmp_path / "run"
    folder = checkpoint_dir(run)
    folder.mkdir(parents=True)
    (folder / ".step-00000001.pt.xyz.tmp").write_bytes(b"")
    (folder / "notes.txt").write_text("keep me")
    for step in (1, 2, 3):
        save_checkpoint(run, checkpoint_state(step), step, keep_last=1)
    assert step_files(run) == ["step-00000003.pt"]
    assert (folder / "notes.txt").read_text() == "keep me"


def test_load_checkpoint_round_trips_a_checkpoint(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save(checkpoint_state(4, epoch=2), path)
    state = load_checkpoint(path)
    assert state["step"] == 4 and state["epoch"] == 2
    assert state["model"]["weight"].device.type == "cpu"


def test_load_checkpoint_refuses_a_truncated_file(tmp_path):
    run = tmp_path / "run"
    path = save_checkpoint(run, checkpoint_state(1), 1, keep_last=2)
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 30):
        broken = tmp_path / f"cut-{cut}.pt"
        broken.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut-.*not a readable checkpoint"):
            load_checkpoint(broken)


def noise_bytes(seed: int, size: int = 4096) -> bytes:
    return bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed)).tolist())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("seed", [0, 1, 2, 4, 5, 6, 7, 8])
def test_load_checkpoint_refuses_random_bytes(tmp_path, seed):
    path = tmp_path / "noise.pt"
    path.write_bytes(noise_bytes(seed))
    with pytest.raises(ValueError, match=re.escape("noise.pt")):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x80\x02h\x05.", id="memo-miss-KeyError"),
        pytest.param(b"\x80\x02.", id="empty-stack-IndexError"),
        pytest.param(noise_bytes(3), id="noise-seed3-KeyError"),
        pytest.param(noise_bytes(12), id="noise-seed12-IndexError"),
    ],
)
def test_load_checkpoint_refuses_corrupt_pickles_with_a_value_error(tmp_path, data):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape("corrupt.pt")):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param({"x": 1}, id="foreign-dict"),
        pytest.param({"format": "other", "model": {}}, id="other-format"),
        pytest.param({"format": "mocoplus.checkpoint"}, id="no-model"),
        pytest.param(torch.zeros(3), id="tensor"),
        pytest.param([1, 2, 3], id="list"),
        pytest.param(None, id="none"),
    ],
)
def test_load_checkpoint_refuses_a_torch_file_that_is_not_ours(tmp_path, content):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a mocoplus checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_refuses_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=re.escape("missing.pt")):
        load_checkpoint(tmp_path / "missing.pt")


class _Payload:
    """Unpickled without restriction, this creates the folder ``marker``: code run by loading a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_the_payload_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.is_dir()  # so the refusals below are meaningful


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_load_checkpoint_refuses_to_run_code_in_a_pickle(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"format": "mocoplus.checkpoint", "model": _Payload(marker)}, protocol=2))
    else:
        torch.save({"format": "mocoplus.checkpoint", "model": {"weight": _Payload(marker)}}, path)
    with pytest.raises(ValueError, match=re.escape("evil.pt")):
        load_checkpoint(path)
    assert not marker.exists()
