"""The benchmark tooling: CPU smoke run of the one command, the pieces it rests on, and
pytest-benchmark micro-benchmarks of the Python-side overhead (argument checking and
dispatch) for small inputs.

Nothing here times a GPU; what is checked is that the numbers the benchmark reports
are computed right (floors, ratios, percentiles), that failures are recorded instead
of ending a run, and that the peer pipeline and the GPU check compute what they claim.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_a2d  # noqa: E402
import bench_qk  # noqa: E402
import cases  # noqa: E402
import contenders  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402

from a2d_kernels import a2d_kl  # noqa: E402
from a2d_kernels.dispatch import select_backend  # noqa: E402
from a2d_kernels.problem import make_problem  # noqa: E402

TINY = cases.Shape("tiny", B=2, T=5, K=7, Cs=4, Ct=6, heads=2)


# ---------------------------------------------------------------- the one command, CPU smoke


def test_smoke_command_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_a2d.py"), "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU contenders (compiled, triton, cuda, peer) are skipped" in proc.stdout
    assert "| shape (B,T,K,Cs,Ct) | mode | dtype | phase | contender |" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    meta = results["meta"]
    for key in ("device_name", "torch", "triton", "date", "copy_bytes_per_s", "driver", "cuda_runtime"):
        assert key in meta
    assert meta["run_mode"] == "cpu-smoke"
    assert meta["copy_bytes_per_s"] > 0
    assert set(meta["skipped_contenders"]) == {"compiled", "triton", "cuda", "peer"}

    recs = results["records"]
    assert {r["contender"] for r in recs} == {"eager"}
    shapes = {r["shape"]["name"] for r in recs}
    assert len(shapes) == len(cases.smoke_plan())
    assert len(recs) == len(shapes) * len(cases.MODES) * len(cases.DTYPES) * len(cases.PHASES)
    for r in recs:
        assert r["status"] == "ok", r
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["floor_bytes"] == cases.floor_bytes(cases.Shape(**r["shape"]), cases.DTYPES[r["dtype"]], r["phase"])
        assert r["x_eager"] == pytest.approx(1.0)
    assert (out / "table.md").read_text().count("\n") >= len(recs)
    for mode in cases.MODES:
        for dtype in cases.DTYPES:
            assert (out / f"sweep_{mode}_{dtype}.png").stat().st_size > 0


def test_failing_contender_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def build(normalize):
        def loss(x):
            raise RuntimeError("kernel exploded")
        return loss

    def build_oom(normalize):
        def loss(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return loss

    monkeypatch.setitem(contenders.CONTENDERS, "broken", contenders.Contender(
        "broken", "raises", lambda device: None, build))
    monkeypatch.setitem(contenders.CONTENDERS, "greedy", contenders.Contender(
        "greedy", "runs out of memory", lambda device: None, build_oom))
    monkeypatch.setattr(cases, "smoke_plan", lambda: [TINY])
    results = bench_a2d.main(["--device", "cpu", "--contenders", "eager,broken,greedy", "--modes", "map",
                              "--dtypes", "fp32", "--out", str(tmp_path), "--no-plots", "--table", "none",
                              "--quiet"])
    by = {}
    for r in results["records"]:
        by.setdefault(r["contender"], set()).add(r["status"])
    assert by["eager"] == {"ok"}
    assert by["broken"] == {"error: RuntimeError: kernel exploded"}
    assert by["greedy"] == {"oom"}
    assert json.loads((tmp_path / "results.json").read_text())["records"]


# ---------------------------------------------------------------- numbers the report rests on


def test_floor_bytes_follow_the_design_formula():
    s = cases.Shape("f", B=2, T=3, K=5, Cs=4, Ct=8)  # N = 30 elements
    n32 = 30 * 4
    assert cases.floor_bytes(s, torch.float32, "forward") == 12 * n32
    assert cases.floor_bytes(s, torch.float32, "backward") == 12 * n32 + 4 * n32
    assert cases.floor_bytes(s, torch.float32, "forward+backward") == 28 * n32
    assert cases.floor_bytes(s, torch.bfloat16, "forward") == 12 * n32 // 2
    with pytest.raises(ValueError, match="phase must be one of"):
        cases.floor_bytes(s, torch.float32, "sideways")


def test_gradient_bytes_are_what_the_reference_backward_returns():
    s = cases.Shape("g", B=2, T=3, K=5, Cs=4, Ct=8)
    x = cases.make_inputs(s, torch.bfloat16, "cpu", seed=1)
    contenders.CONTENDERS["eager"].build("map")(x).backward()
    returned = sum(t.grad.numel() * t.grad.element_size() for t in x.leaves())
    for phase in ("backward", "forward+backward"):
        assert cases.gradient_bytes(s, torch.bfloat16, phase) == returned
    assert cases.gradient_bytes(s, torch.bfloat16, "forward") == 0


def test_full_plan_has_the_issue_shapes_and_a_fixed_token_sweep():
    plan = cases.full_plan()
    assert [s.name for s in plan[:3]] == ["iwslt", "wmt", "long"]
    assert (plan[0].B, plan[0].T, plan[0].Cs, plan[0].Ct) == (64, 64, 12, 24)
    assert (plan[1].B, plan[1].T, plan[1].Cs, plan[1].Ct) == (32, 128, 48, 96)
    assert (plan[2].B, plan[2].T, plan[2].Cs, plan[2].Ct) == (2, 2048, 12, 24)
    sweep = cases.sweep()
    assert [s.T for s in sweep] == [64, 128, 256, 512, 1024, 2048, 4096]
    assert all(s.B * s.T == 4096 and s.T == s.K for s in sweep)
    assert len({s.name for s in plan}) == len(plan) == 8  # iwslt and long are sweep points, not repeats


def test_summarize_uses_median_and_p20_p80():
    t = measure.summarize([float(i) for i in range(1, 11)])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == (5.5, pytest.approx(2.8), pytest.approx(8.2), 10)
    with pytest.raises(ValueError, match="at least one time"):
        measure.summarize([])


def test_derive_and_targets():
    shape = TINY.to_dict()
    base = {"shape": shape, "mode": "map", "dtype": "fp32", "phase": "forward+backward", "status": "ok",
            "p20_ms": 0, "p80_ms": 0, "floor_bytes": 1_000_000}
    recs = [dict(base, contender="eager", median_ms=10.0, peak_extra_bytes=1000, gradient_bytes=200),
            dict(base, contender="compiled", median_ms=4.0, peak_extra_bytes=500, gradient_bytes=200),
            dict(base, contender="triton", median_ms=1.0, peak_extra_bytes=240, gradient_bytes=200),
            dict(base, contender="cuda", status="oom")]
    out = {r["contender"]: r for r in report.derive(recs, copy_bytes_per_s=2e9)}
    t = out["triton"]
    assert t["x_eager"] == pytest.approx(10.0) and t["x_compiled"] == pytest.approx(4.0)
    assert t["achieved_gbps"] == pytest.approx(1.0)  # 1 MB in 1 ms
    assert t["floor_ms"] == pytest.approx(0.5) and t["x_floor"] == pytest.approx(2.0)
    assert t["memory_vs_eager"] == pytest.approx(0.24)
    assert t["workspace_vs_eager"] == pytest.approx(0.05)  # (240 - 200) / (1000 - 200)
    assert "x_eager" not in out["cuda"]
    lines = report.target_lines(list(out.values()), shapes=["tiny"])
    assert "triton: speedup vs eager: worst 10.000x over 1 configs (target >= 8x) MET" in lines
    assert any(line.startswith("triton: time / byte floor") and line.endswith("MISSED") for line in lines)
    assert any(line.startswith("triton: extra peak memory /") and line.endswith("MISSED") for line in lines)
    assert any(line.startswith("triton: extra peak memory beyond the gradients") and line.endswith("MET")
               for line in lines)
    assert "cuda: no successful forward+backward run (oom)" in lines
    assert "| tiny | map | fp32 |" in report.compact_summary(list(out.values()))


# ---------------------------------------------------------------- contenders compute the loss


@pytest.mark.parametrize("normalize", ["map", "row"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_peer_pipeline_matches_the_reference(normalize, dtype, tol):
    # The pipeline with PyTorch's KL in place of Liger's kernel (same contract:
    # log-probabilities in, probabilities as target, summed).
    x = cases.make_inputs(TINY, dtype, "cpu", seed=3)
    peer = contenders.peer_loss_fn(normalize, contenders.torch_kl_sum)(x)
    peer.backward()
    got = [peer.detach(), *[s.grad.clone() for s in x.student], x.weight.grad.clone()]
    x.clear_grads()
    ref = contenders.CONTENDERS["eager"].build(normalize)(x)
    ref.backward()
    want = [ref.detach(), *[s.grad for s in x.student], x.weight.grad]
    for g, w in zip(got, want):
        err = (g.double() - w.double()).norm() / w.double().norm()
        assert err < tol, (normalize, dtype, err)


def test_gpu_check_compares_with_float64_and_can_fail(tmp_path, monkeypatch):
    import gpu_correctness
    import a2d_kernels

    rows = gpu_correctness.check_backend("reference", tmp_path, device="cpu", shapes=[TINY])
    assert len(rows) == 2 * 2 + 2 and all(r["pass"] and r["deterministic"] for r in rows)
    assert json.loads((tmp_path / "check_reference.json").read_text()) == rows
    # The fp32 reference's own error sits next to each error: for the reference backend
    # on fp32 inputs it is the very same computation.
    for r in rows:
        if r["dtype"] == "fp32":
            assert r["floor_loss"] == r["err_loss"] and r["floor_dweight"] == r["err_dweight"]
        assert "[fp32 ref " in gpu_correctness.check_line(r)

    real = a2d_kernels.a2d_kl

    def off_by_a_little(*args, backend="auto", **kwargs):  # a "backend" 5% off
        loss = real(*args, backend="reference", **kwargs)
        return loss * 1.05 if backend == "wrong" else loss

    monkeypatch.setattr(a2d_kernels, "a2d_kl", off_by_a_little)
    rows = gpu_correctness.check_backend("wrong", tmp_path, device="cpu", shapes=[TINY])
    assert rows and not any(r["pass"] for r in rows)
    assert all(r["err_loss"] == pytest.approx(0.05, rel=1e-2) for r in rows)


# ---------------------------------------------------------------- end to end, CPU smoke


def test_e2e_smoke(tmp_path):
    try:
        import a2d_trainer.model  # noqa: F401
        from a2d_kernels.distill import A2DDistiller  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"trainer or distiller not importable: {exc}")
    import bench_e2e

    results = bench_e2e.main(["--device", "cpu", "--smoke", "--backends", "reference", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in results["rows"]}
    assert rows["baseline"]["status"] == "ok"
    assert rows["a2d:reference"]["status"] == "ok"
    assert "a2d_time_share" in rows["a2d:reference"]
    assert (tmp_path / "e2e.json").exists()


def test_qk_sweep_smoke_writes_table_json_and_plot(tmp_path):
    """QK mode vs the map path vs SDPA as T grows (issue 8's benchmark), in its CPU mode."""
    assert bench_qk.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "qk_results.json").read_text())
    ok = {(r["contender"], r["T"]) for r in result["records"] if r["status"] == "ok"}
    assert ok == {(c, t) for c in bench_qk.CONTENDERS for t in (8, 16, 32)}
    assert result["largest_T"] == {"qk": 32, "map": 32, "sdpa": 32}
    assert all("check_rel_err" in r for r in result["records"] if r["contender"] != "sdpa")
    assert "| 32 |" in (tmp_path / "qk_table.md").read_text()
    assert (tmp_path / "qk_sweep.png").stat().st_size > 0


def test_qk_sweep_checks_the_kernels_against_float64(tmp_path, monkeypatch):
    """The Triton QK and map losses (interpreted here) against the float64 reference; a
    loss that is off fails the check and the command's exit status."""
    args = ["--smoke", "--backend", "triton", "--t-max", "8", "--contenders", "qk,map"]
    assert bench_qk.main(args + ["--out", str(tmp_path / "good")]) == 0
    rows = json.loads((tmp_path / "good" / "qk_results.json").read_text())["records"]
    assert [r["contender"] for r in rows] == ["qk", "map"] and all(r["check_pass"] for r in rows)
    # The kernels are far more exact than the fp32 reference on these near-uniform maps.
    assert all(r["check_rel_err"] < r["check_floor"] for r in rows)

    real = bench_qk.qk_loss
    monkeypatch.setattr(bench_qk, "qk_loss", lambda backend: (lambda x: 1.01 * real(backend)(x)))
    assert bench_qk.main(args + ["--out", str(tmp_path / "bad")]) == 1
    rows = json.loads((tmp_path / "bad" / "qk_results.json").read_text())["records"]
    assert [r["check_pass"] for r in rows] == [False, True]
    assert "FAIL" in (tmp_path / "bad" / "qk_table.md").read_text()


def test_qk_sweep_records_oom_and_stops_that_contender(monkeypatch):
    """An out-of-memory is a result (the largest T a path handles), not a crash; the
    contender is not tried at larger T, the others go on."""
    args = bench_qk.parse_args(["--smoke"])
    steps = bench_qk.contender_steps("reference")

    def map_oom_from_16(x):
        if x["sq"].shape[2] >= 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        return steps["map"](x)

    monkeypatch.setattr(bench_qk, "contender_steps", lambda backend: {**steps, "map": map_oom_from_16})
    seen = []
    result = bench_qk.run_sweep(args, torch.device("cpu"), on_record=lambda r: seen.append(len(r["records"])))
    assert seen == list(range(1, 10))  # the results are handed out after every measurement
    status = {(r["contender"], r["T"]): r["status"] for r in result["records"]}
    assert status[("map", 8)] == "ok" and status[("map", 16)] == "oom"
    assert status[("map", 32)] == "skipped (oom at T=16)"
    assert status[("qk", 32)] == "ok"
    assert result["largest_T"]["map"] == 8
    table = bench_qk.markdown_table(result)
    assert "| 16 |" in table and "oom" in table and "Largest T that ran: qk: 32, map: 8, sdpa: 32." in table


def test_qk_sweep_skips_a_measurement_that_would_not_fit_the_budget(monkeypatch):
    args = bench_qk.parse_args(["--smoke", "--budget-s", "30"])
    clock = iter(range(0, 10 ** 6, 1))
    monkeypatch.setattr(bench_qk.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(bench_qk.measure, "time_call", lambda *a, **k: bench_qk.measure.summarize([1500.0]))
    result = bench_qk.run_sweep(args, torch.device("cpu"))
    status = {(r["contender"], r["T"]): r["status"] for r in result["records"]}
    # 1.5 s a call at T=8: the next T would take about 4 x 1.5 s x 9 calls = 54 s > what is left.
    assert status[("qk", 8)] == "ok" and status[("qk", 16)] == "skipped (budget)"
    assert status[("qk", 32)] == "skipped (budget)"


# ---------------------------------------------------------------- Python-side overhead


def _small_inputs():
    x = cases.make_inputs(cases.Shape("micro", B=2, T=8, K=8, Cs=12, Ct=24), torch.float32, "cpu")
    return x


try:
    import pytest_benchmark  # noqa: F401
    HAS_BENCHMARK = True
except ImportError:
    HAS_BENCHMARK = False
needs_benchmark = pytest.mark.skipif(not HAS_BENCHMARK, reason="pytest-benchmark is not installed")


@needs_benchmark
def test_overhead_argument_checking(benchmark):
    x = _small_inputs()
    problem = benchmark(make_problem, x.student, x.teacher, x.weight, x.bias, normalize="map")
    assert problem.student_channels == 12 and problem.teacher_channels == 24


@needs_benchmark
def test_overhead_dispatch(benchmark):
    x = _small_inputs()
    problem = make_problem(x.student, x.teacher, x.weight, x.bias)
    # On the CPU "auto" resolves to the reference (None) without importing anything new.
    assert benchmark(select_backend, "auto", problem) is None


@needs_benchmark
def test_overhead_small_forward(benchmark):
    x = _small_inputs()
    with torch.no_grad():
        loss = benchmark(a2d_kl, x.student, x.teacher, x.weight, x.bias, backend="reference")
    assert torch.isfinite(loss) and loss > 0


@needs_benchmark
def test_overhead_fused_host_path(benchmark, monkeypatch):
    """Everything the Triton backend does on the host for one forward+backward (argument
    checks, dispatch, autograd, tile plans, launch arguments, allocations), with the
    kernel launches stubbed out: the Python-side cost a small GPU case pays on top of its
    kernels. Only runs where the interpreter is on (conftest sets it without a GPU)."""
    triton_a2d = pytest.importorskip("a2d_kernels.ops.triton_a2d")
    if not triton_a2d.INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors through the Triton backend)")

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for kernel in ("map_forward_partials", "map_forward_combine", "row_forward", "a2d_backward"):
        monkeypatch.setattr(triton_a2d, kernel, NoLaunch())
    x = cases.make_inputs(cases.Shape("iwslt-host", B=64, T=64, K=64, Cs=12, Ct=24), torch.float32, "cpu")
    wrt = [*x.student, x.weight, x.bias]

    def step():
        loss = a2d_kl(x.student, x.teacher, x.weight, x.bias, backend="triton")
        return torch.autograd.grad(loss, wrt)

    grads = benchmark(step)
    assert [g.shape for g in grads] == [t.shape for t in wrt]
