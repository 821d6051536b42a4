"""Timing, memory and bandwidth measurement for the A2D benchmarks.

One job: turn "run this callable" into honest numbers. Everything that decides *what*
to run (contenders, shapes) lives in ``contenders.py`` and ``bench_a2d.py``.

On a GPU a measurement is:
- warm-up calls (JIT compilation, autotuning, allocator growth happen here),
- then ``reps`` timed calls, each bracketed by CUDA events, so the time is the GPU's,
- before each timed call an untimed ``setup`` (e.g. the forward whose backward is
  timed) and an L2 flush (a read of a buffer larger than the L2: it leaves no dirty
  lines whose write-back the timed call would pay for); the inputs also rotate over
  several copies whose total size exceeds the L2 cache, so a small shape is never
  timed on data already on chip,
- median with p20/p80 over the repeats (the spread Liger-Kernel reports too),
- the host-inclusive time per call (``wall_ms``): the same calls back to back between
  two synchronizations, divided by their count. The event times hide host work that
  overlaps the previous flush; a training loop does not hide it, so a small shape whose
  Python-side argument checking and launches take longer than its kernels shows it
  here. Only without ``setup`` (a timed backward cannot be separated from its forward),
- peak memory above what was allocated when the timed call started, from
  ``torch.cuda.max_memory_allocated`` deltas in one extra, separate call.

On the CPU the same protocol runs with ``time.perf_counter`` and no memory numbers.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch

# Big enough to evict any current GPU's L2 (H100: 50 MB, H200: 60 MB, B200: 126 MB).
_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class Timing:
    """Milliseconds per call: median, 20th and 80th percentile over ``reps`` calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    first_call_s: Optional[float] = None  # compilation / JIT / autotuning included
    wall_ms: Optional[float] = None       # host-inclusive, back to back (module docstring)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(times_ms: Sequence[float]) -> Timing:
    """Median and p20/p80 of a list of per-call times."""
    if not times_ms:
        raise ValueError("summarize needs at least one time, got an empty list")
    arr = np.asarray(times_ms, dtype=np.float64)
    p20, med, p80 = np.percentile(arr, [20, 50, 80])
    return Timing(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80), reps=len(arr))


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error from any device allocator."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Release cached blocks so one case's peak does not shape the next case.

    Best effort: after a kernel fault the CUDA context is unusable and this raises;
    the fault was already recorded by the measurement that caused it, and cleanup
    must not turn it into a crash of the whole run.
    """
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except RuntimeError:
            pass


def rotation_count(bytes_per_set: int, device: torch.device, cap: int = 4) -> int:
    """How many copies of the inputs to rotate over so their total exceeds 2x the L2.

    Large shapes (already far bigger than the cache) get one copy: no memory is spent
    on rotation where it changes nothing.
    """
    if device.type != "cuda" or bytes_per_set <= 0:
        return 1
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or 64 * 1024 * 1024
    return int(max(1, min(cap, math.ceil(2 * l2 / bytes_per_set))))


class _Flusher:
    """Reads a buffer larger than the L2 cache: the next call starts cold. A read, not a
    write: dirty lines left in the L2 would be written back during the timed call."""

    def __init__(self, device: torch.device):
        self.buf = self.out = None
        if device.type == "cuda":
            self.buf = torch.zeros(_FLUSH_BYTES // 4 // 1024, 1024, dtype=torch.float32, device=device)
            self.out = torch.empty(1024, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        if self.buf is not None:
            torch.sum(self.buf, dim=0, out=self.out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    timed: Callable[[Any], Any],
    inputs: Sequence[Any],
    device: torch.device,
    *,
    setup: Optional[Callable[[Any], Any]] = None,
    warmup: int = 10,
    reps: int = 50,
    min_reps: int = 5,
    target_s: float = 1.0,
) -> Timing:
    """Time ``timed(setup(x))`` (``timed(x)`` without setup) over rotating inputs ``x``.

    The first call (compilation, JIT, autotuning) is timed separately, then
    ``warmup`` calls estimate the per-call time. The repeat count is lowered from ``reps`` (never below ``min_reps``) when the
    warm-up shows that ``reps`` calls would take longer than ``target_s``: a slow
    contender at a long shape must not eat the whole benchmark's time budget.
    """
    if not inputs:
        raise ValueError("time_call needs at least one input set, got none")
    prepare = setup if setup is not None else (lambda x: x)
    flush = _Flusher(device)

    first_start = time.perf_counter()
    timed(prepare(inputs[0]))
    _sync(device)
    first_call_s = time.perf_counter() - first_start

    warm_start = time.perf_counter()
    for i in range(max(1, warmup)):
        timed(prepare(inputs[i % len(inputs)]))
    _sync(device)
    per_call_s = (time.perf_counter() - warm_start) / max(1, warmup)
    reps = int(max(min_reps, min(reps, target_s / max(per_call_s, 1e-9))))

    times: List[float] = []
    wall_ms: Optional[float] = None
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            state = prepare(inputs[i % len(inputs)])
            flush()
            starts[i].record()
            timed(state)
            ends[i].record()
            del state
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        if setup is None:
            wall_start = time.perf_counter()
            for i in range(reps):
                timed(inputs[i % len(inputs)])
            torch.cuda.synchronize(device)
            wall_ms = (time.perf_counter() - wall_start) * 1e3 / reps
    else:
        for i in range(reps):
            state = prepare(inputs[i % len(inputs)])
            t0 = time.perf_counter()
            timed(state)
            times.append((time.perf_counter() - t0) * 1e3)
            del state
    timing = summarize(times)
    timing.first_call_s = first_call_s
    timing.wall_ms = wall_ms
    return timing


def peak_extra_bytes(
    timed: Callable[[Any], Any],
    x: Any,
    device: torch.device,
    *,
    setup: Optional[Callable[[Any], Any]] = None,
) -> Optional[int]:
    """Peak bytes allocated by ``timed`` above what was live when it started.

    What ``setup`` leaves alive (the forward's saved tensors, for a timed backward) is
    part of the baseline, not of the peak. None on devices without allocator stats.
    """
    if device.type != "cuda":
        return None
    state = setup(x) if setup is not None else x
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = timed(state)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, state
    return int(peak)


def retained_bytes(run: Callable[[Any], Any], x: Any, device: torch.device) -> Optional[int]:
    """Bytes still allocated after ``run(x)`` while its result is alive.

    For a forward this is what autograd keeps for the backward.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    out = run(x)
    torch.cuda.synchronize(device)
    kept = torch.cuda.memory_allocated(device) - base
    del out
    return int(kept)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device copy bandwidth in bytes/s: (read + write) bytes of ``dst.copy_(src)``.

    This is the practical ceiling a memory-bound kernel is compared with, measured on
    the same device in the same run (not the datasheet number).
    """
    if device.type != "cuda":
        nbytes = min(nbytes, 64 << 20)  # the CPU smoke mode: small and quick
        reps = min(reps, 5)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = time_call(lambda _: dst.copy_(src), [None], device, warmup=3, reps=reps,
                       min_reps=3, target_s=2.0)
    del src, dst
    free_memory(device)
    return 2 * n * 4 / (timing.median_ms * 1e-3)


def device_summary(device: torch.device) -> dict:
    """Name, driver and library versions of ``device``, for the results file."""
    import platform

    info = {
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_bytes"] = int(props.total_memory)
        info["l2_cache_bytes"] = int(getattr(props, "L2_cache_size", 0))
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["driver"] = _nvidia_driver()
    else:
        info["device_name"] = platform.processor() or platform.machine() or "cpu"
        info["driver"] = None
    return info


def _nvidia_driver() -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
