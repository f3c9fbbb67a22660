"""Precision selection: explicit choices are honoured, auto follows the hardware."""

from __future__ import annotations

import pytest
import torch

from pipeline.precision import cpu_supports_bf16, resolve_precision


def test_explicit_choices_are_honoured():
    fp32 = resolve_precision("fp32")
    assert fp32.name == "fp32"
    assert not fp32.channels_last
    bf16 = resolve_precision("bf16")
    assert (bf16.name, bf16.autocast_dtype, bf16.channels_last) == ("bf16", torch.bfloat16, True)
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with fp32.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_auto_follows_the_detected_hardware():
    assert resolve_precision("auto").name == ("bf16" if cpu_supports_bf16() else "fp32")


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8")
