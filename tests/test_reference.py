"""The pure-PyTorch reference against an independent float64 restatement of the spec."""
import pytest
import torch

from a2d_kernels import A2DLoss, a2d_kl
from helpers import assert_close, attention_maps, grads, independent_a2d_kl, padding_mask, rel_err

# (B, student heads per layer, teacher heads per layer, T, K)
SHAPES = [
    (2, [3], [5], 4, 6),            # stacked-like, Cs and Ct not powers of two, T != K
    (1, [2, 3], [4, 1, 2], 5, 5),   # B = 1, unequal heads per layer
    (3, [4, 4, 4], [4] * 6, 1, 7),  # T = 1 (one query), the release's head layout
    (2, [3, 2], [6], 6, 1),         # K = 1 (every row is a single key)
]


def _case(shape, dtype=torch.float64, sparse=False):
    B, sh, th, T, K = shape
    student = attention_maps(B, sh, T, K, dtype=dtype, requires_grad=True, sparse=sparse)
    teacher = attention_maps(B, th, T, K, dtype=dtype, sparse=sparse)
    Cs, Ct = sum(sh), sum(th)
    weight = torch.randn(Ct, Cs, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(Ct, dtype=torch.float64, requires_grad=True)
    return student, teacher, weight, bias


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", ["map", "row"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_independent_oracle(shape, normalize, reduction, masked):
    student, teacher, weight, bias = _case(shape, sparse=normalize == "row")
    B, T, K = shape[0], shape[3], shape[4]
    kpm = padding_mask(B, K) if masked else None
    qm = padding_mask(B, T) if masked else None
    kwargs = dict(normalize=normalize, reduction=reduction, key_padding_mask=kpm, query_mask=qm)

    loss = a2d_kl(student, teacher, weight, bias, backend="reference", **kwargs)
    expected = independent_a2d_kl(student, teacher, weight, bias, **kwargs)
    assert loss.dtype == torch.float64
    assert rel_err(loss, expected) < 1e-10
    inputs = [*student, weight, bias]
    names = [f"d_student[{i}]" for i in range(len(student))] + ["d_weight", "d_bias"]
    for name, g, w in zip(names, grads(loss, inputs), grads(expected, inputs)):
        assert_close(g, w, rtol=1e-9, atol=1e-12, what=name)


@pytest.mark.parametrize("normalize", ["map", "row"])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_gradcheck(normalize, masked):
    B, T, K = 2, 3, 4
    student, teacher, weight, bias = _case((B, [2, 1], [2], T, K))
    kpm = padding_mask(B, K) if masked else None
    qm = padding_mask(B, T) if masked else None

    def loss(s0, s1, w, b):
        return a2d_kl([s0, s1], teacher, w, b, normalize=normalize, reduction="mean",
                      key_padding_mask=kpm, query_mask=qm, backend="reference")

    assert torch.autograd.gradcheck(loss, (*student, weight, bias))


def test_map_mode_bias_gradient_is_zero():
    # A constant shift of a whole map cancels in its softmax.
    student, teacher, weight, bias = _case((2, [3], [4], 5, 6))
    loss = a2d_kl(student, teacher, weight, bias, normalize="map")
    (d_bias,) = torch.autograd.grad(loss, [bias])
    assert d_bias.abs().max() < 1e-12


def test_identical_maps_give_zero_loss():
    maps = attention_maps(2, [4], 5, 5, dtype=torch.float64)[0]
    eye = torch.eye(4, dtype=torch.float64)
    # Row mode: the mixed student values are logits, the teacher row probabilities, so
    # Z = log p reproduces the teacher exactly.
    loss = a2d_kl(maps.log(), maps, eye, torch.zeros(4, dtype=torch.float64), normalize="row")
    assert abs(loss.item()) < 1e-12
    # Map mode uses the teacher probabilities as logits too (as released): Z = A matches.
    loss = a2d_kl(maps, maps, eye, None, normalize="map")
    assert abs(loss.item()) < 1e-12
    assert a2d_kl(maps, maps, eye, None, normalize="row").item() > 0.1


def _oracle_autograd(s, t, weight, bias, **kw):
    return a2d_kl(s, t, weight, bias, backend="reference", **kw)


def _oracle_closed_form(s, t, weight, bias, **kw):
    from a2d_kernels.custom_ops import REFERENCE_KERNELS, fused_a2d_kl
    from a2d_kernels.problem import make_problem

    return fused_a2d_kl(REFERENCE_KERNELS, make_problem(s, t, weight, bias, **kw))


@pytest.mark.parametrize("loss_fn", [_oracle_autograd, _oracle_closed_form], ids=["autograd", "closed_form"])
@pytest.mark.parametrize("normalize", ["map", "row"])
def test_masked_positions_do_not_matter(normalize, loss_fn):
    """Excluded entries may hold anything, NaN and inf included (a fully padded softmax
    row is NaN): loss and every gradient are those of the clean inputs."""
    B, T, K = 3, 5, 6
    student, teacher, weight, bias = _case((B, [2, 3], [4], T, K))
    kpm, qm = padding_mask(B, K), padding_mask(B, T)
    assert kpm.any() and qm.any()
    excluded = kpm[:, None, None, :] | qm[:, None, :, None]

    def run(s, t):
        loss = loss_fn(s, t, weight, bias, normalize=normalize, key_padding_mask=kpm, query_mask=qm)
        return loss, grads(loss, [*s, weight, bias])

    loss, clean = run(student, teacher)
    for d in clean[:len(student)]:
        assert d.masked_select(excluded).abs().max() == 0
    # Overwrite every excluded entry of both sides with garbage: nothing changes.
    for garbage in (123.0, float("nan"), float("inf")):
        noisy_s = [s.detach().masked_fill(excluded, garbage).requires_grad_() for s in student]
        noisy_t = [t.masked_fill(excluded, garbage) for t in teacher]
        loss2, noisy = run(noisy_s, noisy_t)
        assert torch.equal(loss, loss2), garbage
        for a, b in zip(clean, noisy):
            assert torch.allclose(a, b, rtol=0, atol=1e-15), garbage
    # ...while the same garbage in a kept position does change the loss.
    poked = [t.clone() for t in teacher]
    poked[0][0, 0, 0, 0] = 7.0
    assert not torch.equal(run(student, poked)[0], loss)


def test_stacked_equals_per_layer_and_teacher_gets_no_grad():
    student, teacher, weight, bias = _case((2, [2, 3], [1, 4], 4, 3))
    teacher = [t.clone().requires_grad_() for t in teacher]
    per_layer = a2d_kl(student, teacher, weight, bias)
    stacked = a2d_kl(torch.cat(student, 1), torch.cat(teacher, 1), weight, bias)
    assert torch.allclose(per_layer, stacked, rtol=1e-14, atol=0)
    per_layer.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None for s in student)


def test_low_precision_inputs_accumulate_in_fp32():
    B, T, K = 2, 4, 5
    student = attention_maps(B, [3], T, K, dtype=torch.bfloat16, requires_grad=True)
    teacher = attention_maps(B, [2], T, K, dtype=torch.float16)
    weight = torch.randn(2, 3, requires_grad=True)
    loss = a2d_kl(student, teacher, weight, None, normalize="row")
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert student[0].grad.dtype == torch.bfloat16
    assert weight.grad.dtype == torch.float32
    expected = independent_a2d_kl(student, teacher, weight, None, normalize="row")
    assert rel_err(loss, expected) < 1e-6


def test_non_contiguous_inputs_are_accepted():
    B, T, K = 2, 4, 5
    base = attention_maps(B, [3], K, T, dtype=torch.float64)[0]
    student = base.transpose(2, 3)  # (B, 3, T, K), non-contiguous
    assert not student.is_contiguous()
    teacher = attention_maps(B, [2], T, K, dtype=torch.float64)
    weight = torch.randn(2, 3, dtype=torch.float64)
    got = a2d_kl(student, teacher, weight)
    want = a2d_kl(student.contiguous(), teacher, weight)
    assert torch.equal(got, want)


def test_a2dloss_initializes_like_conv2d():
    torch.manual_seed(1234)
    conv = torch.nn.Conv2d(12, 24, 1)
    torch.manual_seed(1234)
    loss_fn = A2DLoss(student_channels=[4, 4, 4], teacher_channels=24)
    assert torch.equal(loss_fn.weight, conv.weight.flatten(1))
    assert torch.equal(loss_fn.bias, conv.bias)


def test_a2dloss_matches_functional_and_trains():
    student, teacher, _, _ = _case((2, [3, 3], [4, 4], 5, 5), dtype=torch.float32)
    loss_fn = A2DLoss(6, 8, normalize="row", reduction="batchmean")
    got = loss_fn(student, teacher)
    want = a2d_kl(student, teacher, loss_fn.weight, loss_fn.bias, normalize="row", reduction="batchmean")
    assert torch.equal(got, want)
    got.backward()
    assert loss_fn.weight.grad.abs().max() > 1e-3
    # Each row's softmax ignores a shift, so the bias gradient is 0 up to rounding (in
    # both modes: a row's dZ = q * P - p sums to P - P).
    assert loss_fn.bias.grad is not None and loss_fn.bias.grad.abs().max() < 1e-6


def test_conv2d_weight_is_accepted_as_is():
    student, teacher, _, _ = _case((2, [3], [4], 3, 3), dtype=torch.float32)
    conv = torch.nn.Conv2d(3, 4, 1)
    assert torch.equal(a2d_kl(student, teacher, conv.weight, conv.bias),
                       a2d_kl(student, teacher, conv.weight.flatten(1), conv.bias))


def test_autocast_does_not_lower_the_mixing_precision():
    student, teacher, weight, bias = _case((2, [3, 3], [4, 4], 6, 6), dtype=torch.float32)
    expected = a2d_kl(student, teacher, weight.float(), bias.float(), normalize="row")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = a2d_kl(student, teacher, weight.float(), bias.float(), normalize="row")
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-6
