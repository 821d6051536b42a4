"""Argument checking: every bad input raises before any backend runs, with a message
that names the argument, what it got and what it needs."""
import pytest
import torch

import a2d_kernels
from a2d_kernels import A2DLoss, a2d_kl
from helpers import attention_maps

B, T, K = 2, 3, 4


@pytest.fixture
def good():
    student = attention_maps(B, [2, 3], T, K)
    teacher = attention_maps(B, [4], T, K)
    return dict(student_maps=student, teacher_maps=teacher, weight=torch.randn(4, 5), bias=torch.randn(4))


def _call(args, **overrides):
    kwargs = {**args, **overrides}
    return a2d_kl(kwargs.pop("student_maps"), kwargs.pop("teacher_maps"), kwargs.pop("weight"),
                  kwargs.pop("bias"), **kwargs)


def test_good_call_runs(good):
    assert torch.isfinite(_call(good))


@pytest.mark.parametrize("override, exc, pattern", [
    (dict(student_maps=[]), ValueError, r"student_maps is an empty list"),
    (dict(teacher_maps=()), ValueError, r"teacher_maps is an empty tuple"),
    (dict(student_maps="maps"), TypeError, r"student_maps must be a tensor .* got str"),
    (dict(student_maps=[torch.rand(B, 2, T, K), "x"]), TypeError, r"student_maps\[1\] must be a torch.Tensor"),
    (dict(student_maps=torch.rand(B, 5, T)), ValueError, r"student_maps must be 4-D .* got 3-D with shape \(2, 5, 3\)"),
    (dict(teacher_maps=[torch.rand(B, 4, T, K, 1)]), ValueError, r"teacher_maps\[0\] must be 4-D"),
    (dict(student_maps=torch.ones(B, 5, T, K, dtype=torch.long)), TypeError,
     r"student_maps must be a floating tensor .* got torch.int64"),
    (dict(student_maps=[torch.rand(B, 2, T, K), torch.rand(B, 3, T, K, dtype=torch.float64)]), TypeError,
     r"student_maps layers must share one dtype: layer 0 is torch.float32, layer 1 is torch.float64"),
    (dict(student_maps=[torch.rand(B, 2, T, K), torch.rand(B, 3, T + 1, K)]), ValueError,
     r"student_maps\[1\] has shape \(2, 3, 4, 4\) .* same B=2, T=3, K=4"),
    (dict(teacher_maps=[torch.rand(B + 1, 4, T, K)]), ValueError, r"teacher_maps\[0\] has shape \(3, 4, 3, 4\)"),
    (dict(teacher_maps=[torch.rand(B, 4, T, K + 1)]), ValueError, r"teacher_maps\[0\] has shape"),
    (dict(student_maps=torch.rand(B, 0, T, K)), ValueError, r"student_maps has 0 heads"),
    (dict(weight=torch.randn(4, 6)), ValueError,
     r"weight must have shape \(Ct, Cs\) = \(4, 5\) .* got \(4, 6\)"),
    (dict(weight=torch.randn(5, 4)), ValueError, r"weight must have shape \(Ct, Cs\) = \(4, 5\)"),
    (dict(weight=torch.randn(4, 6, 1, 1)), ValueError, r"weight must have shape .* got \(4, 6, 1, 1\)"),
    (dict(weight=torch.ones(4, 5, dtype=torch.int32)), TypeError, r"weight must be a floating tensor"),
    (dict(weight=[[1.0]]), TypeError, r"weight must be a tensor of shape \(Ct, Cs\) = \(4, 5\), got list"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(Ct,\) = \(4,\), got \(5,\)"),
    (dict(bias=torch.randn(4, 1)), ValueError, r"bias must have shape \(Ct,\)"),
    (dict(key_padding_mask=torch.zeros(B, K)), TypeError,
     r"key_padding_mask must be a bool tensor .* got dtype torch.float32.*attention_mask == 0"),
    (dict(key_padding_mask=torch.zeros(B, T, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(2, 4\) \(B, K\), got \(2, 3\)"),
    (dict(query_mask=torch.zeros(B, K, dtype=torch.bool)), ValueError,
     r"query_mask must have shape \(2, 3\) \(B, T\), got \(2, 4\)"),
    (dict(query_mask=torch.zeros(B, T, dtype=torch.long)), TypeError, r"query_mask must be a bool tensor"),
    (dict(normalize="rows"), ValueError, r"normalize must be one of \('map', 'row'\), got 'rows'"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('sum', 'mean', 'batchmean'\), got 'avg'"),
    (dict(backend="cudnn"), ValueError, r"backend must be one of .* got 'cudnn'"),
])
def test_bad_arguments_raise_clear_errors(good, override, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(good, **override)


def test_inputs_on_different_devices_are_rejected(good):
    # "meta" stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match=r"teacher_maps\[0\] is on meta but student_maps\[0\] is on cpu"):
        _call(good, teacher_maps=[torch.rand(B, 4, T, K, device="meta")])
    with pytest.raises(ValueError, match=r"weight is on meta but the attention maps are on cpu"):
        _call(good, weight=torch.randn(4, 5, device="meta"))
    with pytest.raises(ValueError, match=r"key_padding_mask is on meta"):
        _call(good, key_padding_mask=torch.zeros(B, K, dtype=torch.bool, device="meta"))


def test_unavailable_backend_says_why(good):
    report = a2d_kernels.backends()
    for name, entry in report.items():
        assert set(entry) == {"available", "reason"}
        if not entry["available"]:
            with pytest.raises(RuntimeError, match=rf"backend='{name}' is not available on cpu: .+"):
                _call(good, backend=name)
    assert report["reference"]["available"]
    # The CUDA kernels cannot run on CPU tensors whatever else is installed.
    assert not a2d_kernels.backends("cpu")["cuda"]["available"]


def test_backend_names_are_the_dispatchers():
    from a2d_kernels.dispatch import backend_names
    from a2d_kernels.problem import BACKEND_NAMES
    from a2d_kernels.qk import QK_BACKENDS

    assert backend_names("map") == BACKEND_NAMES == ("auto", "reference", "triton", "cuda")
    assert QK_BACKENDS == ("auto", "reference", "triton")


def test_auto_uses_the_reference_on_cpu(good):
    assert torch.equal(_call(good, backend="auto"), _call(good, backend="reference"))


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(student_channels=0, teacher_channels=4), ValueError, r"student_channels must be positive"),
    (dict(student_channels=[4, -1], teacher_channels=4), ValueError, r"student_channels must be positive"),
    (dict(student_channels=4, teacher_channels="4"), TypeError, r"teacher_channels must be a positive int"),
    (dict(student_channels=[], teacher_channels=4), TypeError, r"student_channels must be a positive int"),
    (dict(student_channels=4, teacher_channels=4, normalize="rows"), ValueError, r"normalize must be one of"),
    (dict(student_channels=4, teacher_channels=4, reduction="none"), ValueError, r"reduction must be one of"),
    (dict(student_channels=4, teacher_channels=4, backend="jax"), ValueError, r"backend must be one of"),
])
def test_a2dloss_constructor_checks(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        A2DLoss(**kwargs)


def test_a2dloss_channel_mismatch_names_the_module_shapes(good):
    loss_fn = A2DLoss(student_channels=6, teacher_channels=4)
    with pytest.raises(ValueError, match=r"weight must have shape \(Ct, Cs\) = \(4, 5\) .* got \(4, 6\)"):
        loss_fn(good["student_maps"], good["teacher_maps"])
