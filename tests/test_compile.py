"""torch.compile(fullgraph=True) of a training step, and the custom-op registration.

A "step" is the forward of the loss plus ``torch.autograd.grad`` of it: both land in
one graph (Dynamo's ``trace_autograd_ops``), so ``fullgraph=True`` fails on any graph
break and a frame count of 1 rules out recompiles. Compiled results must equal eager.
Shapes stay tiny: compiling on a 2-core CPU costs seconds per graph.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from a2d_kernels import A2DLoss, a2d_kl, make_problem
from a2d_kernels.custom_ops import (REFERENCE_KERNELS, ReferenceKernels, a2d_kl_bwd, a2d_kl_fwd, fused_a2d_kl,
                                    op_a2d_kl)
from a2d_kernels.distill import A2DDistiller
from a2d_kernels.reference import a2d_kl_reference

from a2d_kernels import dispatch as dispatch_module, functional as functional_module


B, T, K = 2, 3, 5
STUDENT_HEADS, TEACHER_HEADS = (2, 3), (4,)


def _inputs(device="cpu", dtype=torch.float32, T=T, K=K, permuted=False):
    """Maps and padding masks; ``permuted``: student layer 0 is (B, T, H, K) memory seen as
    (B, H, T, K), a dense but non-contiguous layout the gradients must keep."""
    student = [torch.randn(B, h, T, K, device=device, dtype=dtype).softmax(-1).requires_grad_()
               for h in STUDENT_HEADS]
    if permuted:
        h = STUDENT_HEADS[0]
        student[0] = torch.randn(B, T, h, K, device=device, dtype=dtype).softmax(-1).transpose(1, 2)
        student[0] = student[0].detach().requires_grad_()
    teacher = [torch.randn(B, h, T, K, device=device, dtype=dtype).softmax(-1) for h in TEACHER_HEADS]
    key_pad = torch.zeros(B, K, dtype=torch.bool, device=device)
    key_pad[0, -2:] = True
    query_pad = torch.zeros(B, T, dtype=torch.bool, device=device)
    query_pad[1, -1] = True
    return student, teacher, key_pad, query_pad


def _params(dtype=torch.float32, device="cpu", transposed=False):
    Ct, Cs = sum(TEACHER_HEADS), sum(STUDENT_HEADS)
    weight = torch.randn(Ct, Cs, dtype=dtype, device=device, requires_grad=True)
    if transposed:
        weight = torch.randn(Cs, Ct, dtype=dtype, device=device).t().requires_grad_()
    bias = torch.randn(Ct, dtype=dtype, device=device, requires_grad=True)
    return weight, bias


class _Recorder:
    """A compile backend that keeps each Dynamo graph, then hands it to ``inner``."""

    def __init__(self, inner):
        self.counter = CompileCounterWithBackend(inner)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(str(gm.graph))
        return self.counter(gm, example_inputs)


def _compile_once(step, args, inner="inductor"):
    """Compile ``step`` with fullgraph=True, run it, and check it made one graph."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace torch.autograd.grad into a graph")
    torch._dynamo.reset()
    recorder = _Recorder(inner)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = torch.compile(step, backend=recorder, fullgraph=True)(*args)
    assert recorder.counter.frame_count == 1, recorder.graphs
    return got, recorder.graphs


def _assert_same(got, want, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- reference path


def test_a2d_loss_row_mode_step_compiles_to_one_graph_equal_to_eager():
    """Row mode, both masks, "mean" (a mask-dependent tensor denominator), Inductor."""
    student, teacher, key_pad, query_pad = _inputs()
    loss_fn = A2DLoss(list(STUDENT_HEADS), list(TEACHER_HEADS), normalize="row", reduction="mean",
                      backend="reference")

    def step(student, teacher, key_pad, query_pad):
        loss = loss_fn(student, teacher, key_padding_mask=key_pad, query_mask=query_pad)
        grads = torch.autograd.grad(loss * 3.0, [*student, loss_fn.weight, loss_fn.bias])
        return loss.detach(), grads

    got, _ = _compile_once(step, (student, teacher, key_pad, query_pad))
    _assert_same(got, step(student, teacher, key_pad, query_pad))


def test_distiller_step_compiles_to_one_graph_equal_to_eager():
    """The bundle's glue (per-kind masks, 1/2 decoder weights, epoch decay) in map mode.

    aot_eager: Inductor's code generation adds nothing to what this test checks (no
    graph break, same numbers) and costs tens of seconds on a small CPU.
    """
    student, teacher, _, pad = _inputs(T=T, K=T)  # self-attention shapes: one mask for both sides
    kinds = ("encoder", "decoder_self", "decoder_cross")
    distiller = A2DDistiller({k: list(STUDENT_HEADS) for k in kinds}, {k: list(TEACHER_HEADS) for k in kinds},
                             beta=0.5, decay=0.9, backend="reference")
    params = list(distiller.parameters())

    def step(student, teacher, pad):
        out = distiller({k: student for k in kinds}, {k: teacher for k in kinds}, epoch=2,
                        src_padding_mask=pad, tgt_padding_mask=pad)
        grads = torch.autograd.grad(out.total, [*student, *params])
        return out.total.detach(), grads

    got, _ = _compile_once(step, (student, teacher, pad), inner="aot_eager")
    _assert_same(got, step(student, teacher, pad))


# ----------------------------------------------------------------------------- custom ops


# The two ways a KernelBackend runs: the custom ops (what torch.compile records) and the
# eager autograd.Function (what fused_a2d_kl uses outside compile).
PATHS = {
    "ops": lambda problem: op_a2d_kl(REFERENCE_KERNELS.name, problem),
    "eager": lambda problem: fused_a2d_kl(REFERENCE_KERNELS, problem),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("normalize", ["map", "row"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_paths_match_the_oracle_in_eager(path, normalize, reduction, masked):
    """Both paths' autograd wiring and ReferenceKernels' closed-form backward vs autograd of the oracle."""
    student, teacher, key_pad, query_pad = _inputs()
    weight, bias = _params()
    masks = dict(key_padding_mask=key_pad, query_mask=query_pad) if masked else {}
    problem = make_problem(student, teacher, weight, bias, normalize=normalize, reduction=reduction, **masks)
    wrt = [*student, weight, bias]
    want = a2d_kl_reference(problem)
    want_grads = torch.autograd.grad(want * 1.7, wrt)
    got = PATHS[path](problem)
    got_grads = torch.autograd.grad(got * 1.7, wrt)
    _assert_same(got, want, rtol=1e-6, atol=0)
    _assert_same(got_grads, want_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_kernel_paths_without_student_grad_give_weight_grads(path):
    student, teacher, key_pad, _ = _inputs()
    student = [s.detach() for s in student]
    weight, _ = _params()
    problem = make_problem(student, teacher, weight, None, normalize="row", key_padding_mask=key_pad)
    (got,) = torch.autograd.grad(PATHS[path](problem), [weight])
    (want,) = torch.autograd.grad(a2d_kl_reference(problem), [weight])
    _assert_same(got, want)


@pytest.mark.parametrize("normalize,with_bias,masked,strided",
                         [("map", True, True, False), ("row", False, False, True)])
def test_opcheck_custom_ops_with_the_cpu_kernel(normalize, with_bias, masked, strided):
    student, teacher, key_pad, query_pad = _inputs(permuted=strided)
    weight, bias = _params(transposed=strided)
    bias = bias if with_bias else None
    key_valid, query_valid = (~key_pad, ~query_pad) if masked else (None, None)
    torch.library.opcheck(a2d_kl_fwd, ("reference", student, teacher, weight, bias, key_valid, query_valid,
                                       normalize, "mean"))
    torch.library.opcheck(a2d_kl_bwd, ("reference", torch.tensor(1.3), [s.detach() for s in student], teacher,
                                       weight.detach(), None if bias is None else bias.detach(),
                                       key_valid, query_valid, [], normalize, "mean", masked))


def test_custom_op_step_compiles_to_one_graph_holding_the_op():
    student, teacher, key_pad, query_pad = _inputs()
    weight, bias = _params()

    def step(student, teacher, weight, bias, key_pad, query_pad):
        problem = make_problem(student, teacher, weight, bias, normalize="map", reduction="sum",
                               key_padding_mask=key_pad, query_mask=query_pad)
        loss = fused_a2d_kl(REFERENCE_KERNELS, problem)  # the ops, since this is compiling
        return loss.detach(), torch.autograd.grad(loss, [*student, weight, bias])

    args = (student, teacher, weight, bias, key_pad, query_pad)
    got, graphs = _compile_once(step, args)
    assert "a2d_kernels.a2d_kl_fwd" in graphs[0]
    _assert_same(got, step(*args))


class _StandIn(ReferenceKernels):
    """The reference kernels registered under a fused backend's name, for the dispatch test."""

    def __init__(self, name):
        self.name = name


def test_a2d_kl_dispatches_fused_backends_through_the_custom_op(monkeypatch):
    """a2d_kl(backend="triton") on the CPU, with a stand-in backend: one graph, holding the op."""
    if functional_module.fused_a2d_kl is not fused_a2d_kl:
        pytest.skip("a2d_kernels.functional still calls autograd.FusedA2DKL, not custom_ops.fused_a2d_kl")
    monkeypatch.setitem(dispatch_module._loaded, "triton", (_StandIn("triton"), None))
    student, teacher, key_pad, query_pad = _inputs()
    weight, bias = _params()

    def step(student, teacher, weight, bias, key_pad, query_pad):
        loss = a2d_kl(student, teacher, weight, bias, normalize="row", reduction="mean",
                      key_padding_mask=key_pad, query_mask=query_pad, backend="triton")
        return loss.detach(), torch.autograd.grad(loss, [*student, weight])

    args = (student, teacher, weight, bias, key_pad, query_pad)
    got, graphs = _compile_once(step, args, inner="aot_eager")
    assert "a2d_kernels.a2d_kl_fwd" in graphs[0]
    _assert_same(got, step(*args))


# ----------------------------------------------------------------------------- fused backends


def _fused_backend_or_skip(name, device):
    why = dispatch_module._reason(name, torch.device(device))
    if why is not None:
        pytest.skip(f"backend {name!r} on {device}: {why}")
    backend = dispatch_module._load(name)[0]
    if not hasattr(backend, "saved_specs"):
        pytest.skip(f"backend {name!r} has no saved_specs(problem) yet: its ops have no fake")
    return backend


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_fused_backend_saved_specs_and_opcheck(name):
    """Fake vs real kernel metadata (shapes, strides, dtypes) for every fused backend that runs here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = _fused_backend_or_skip(name, device)
    student, teacher, key_pad, query_pad = _inputs(device, permuted=True)
    weight, bias = _params(device=device, transposed=True)
    for normalize in ("map", "row"):
        problem = make_problem(student, teacher, weight, bias, normalize=normalize,
                               key_padding_mask=key_pad, query_mask=query_pad)
        _, saved = backend.forward(problem)
        assert [(tuple(t.shape), t.dtype) for t in saved] == \
            [(tuple(shape), dtype) for shape, dtype in backend.saved_specs(problem)]
        torch.library.opcheck(a2d_kl_fwd, (name, student, teacher, weight, bias, ~key_pad, ~query_pad,
                                           normalize, "sum"))
        torch.library.opcheck(a2d_kl_bwd, (name, torch.tensor(1.3, device=device), [s.detach() for s in student],
                                           teacher, weight.detach(), bias.detach(), ~key_pad, ~query_pad,
                                           list(saved), normalize, "sum", True))


@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("normalize", ["map", "row"])
def test_fused_backend_step_compiles_to_one_graph_equal_to_eager(name, normalize):
    """The public a2d_kl with real kernels: on a GPU with Inductor; on the CPU with the
    Triton interpreter and aot_eager (Inductor would only add C++ compile time)."""
    if functional_module.fused_a2d_kl is not fused_a2d_kl:
        pytest.skip("a2d_kernels.functional still calls autograd.FusedA2DKL, not custom_ops.fused_a2d_kl")
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    _fused_backend_or_skip(name, device)
    student, teacher, key_pad, query_pad = _inputs(device, **(dict(T=33, K=70) if on_gpu else {}))
    weight, bias = _params(device=device)

    def step(student, teacher, weight, bias, key_pad, query_pad):
        loss = a2d_kl(student, teacher, weight, bias, normalize=normalize, reduction="mean",
                      key_padding_mask=key_pad, query_mask=query_pad, backend=name)
        return loss.detach(), torch.autograd.grad(loss, [*student, weight, bias])

    args = (student, teacher, weight, bias, key_pad, query_pad)
    got, graphs = _compile_once(step, args, inner="inductor" if on_gpu else "aot_eager")
    assert "a2d_kernels.a2d_kl_fwd" in graphs[0]
    _assert_same(got, step(*args), rtol=1e-5, atol=1e-6)
