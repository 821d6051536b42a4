"""One call on a GPU machine: build, test, check every fused backend, benchmark everything.

    bash scripts/gpu_check.sh                                   # the whole thing (see there)
    python benchmarks/gpu_check.py --out DIR                    # env, check, bench, e2e
    python benchmarks/gpu_check.py --out DIR --stages all --export "$OUT" --deadline-s 550

Stages (``--stages``, comma-separated, or ``all``), each in its own process group with
its own timeout, all of them inside one deadline (``--deadline-s``, from this
program's start; a stage that no longer fits is skipped and says so):

``env``    date, device, driver, torch / triton / CUDA / nvcc / compiler versions and a
           hash of the sources: ``environment.json`` (and ``environment.txt``).
``build``  ``setup.py build_ext --inplace`` with ``A2D_BUILD_CUDA=1`` for this GPU's
           architecture only (``A2D_CUDA_ARCHS`` overrides): the CUDA extension, with no
           pip, no network and nothing installed (run with the repository and
           ``python/`` on ``PYTHONPATH``, as ``scripts/gpu_check.sh`` does).
``check``  each available fused backend against the float64 reference at the three
           realistic shapes (IWSLT-like, WMT-like, long), both modes, fp32 and bf16, plus
           a masked case; loss and every gradient (student maps, weight, bias), with an
           upstream gradient that is not 1; pass/fail at DESIGN.md section 4's
           tolerances (fp32 < 1e-5, bf16 < 1e-2, NaN never passes) and a bitwise
           determinism check (two runs, same bits).
``tests``  the test files that run on the device (build, CUDA, Triton, QK, compile);
           pytest-xdist and pytest-timeout are used when installed.
``qk``     ``bench_qk.py``: QK mode vs the map path vs SDPA as T grows (512 ... 65536, bf16),
           at most 180 s; its table goes into the summary.
``bench``  ``bench_a2d.py --isolate`` with what the deadline leaves (minus e2e's share).
``e2e``    ``bench_e2e.py``: the whole distillation step.

The default, ``env,check,bench,e2e``, builds nothing: it times whatever backends the
installed package provides. A failing stage never stops the later ones, a step that
hangs is killed with its whole process group at its timeout, and the exit status is 0
whatever failed (the summary says what did): the output must come back.

Everything is written under ``--out`` as it happens. With ``--export DIR`` (the device
tool's ``$OUT``, which returns at most 8 files) a fixed set of at most 7 files is
refreshed in DIR after every stage, so a run cut short still returns what it did:
``summary.txt``, ``environment.json``, ``check.json``, ``bench_results.json``,
``bench_table.md``, ``e2e.json`` and ``gpu_check_all.tar.gz`` (the whole ``--out``
folder: every log, the per-contender parts, plots, the pytest JUnit XML). The summary
is printed last (the part of the output a reader sees first).

``--smoke`` runs the same orchestration on a machine without a GPU (check on the CPU
through the Triton interpreter at a tiny shape, tests limited to ``tests/test_build.py``,
benchmarks in their CPU smoke modes): it checks this script, not the kernels.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# This file is the command line and the orchestration (stages, process groups, the
# deadline, exports, the summary); torch is imported only by the child processes it
# starts (this same file with a hidden child-mode flag). The rest of its job:
#   gpu_env.py          environment facts (environment_info, backends_info, find_nvcc)
#   gpu_correctness.py  the check stage: a fused backend against the float64 reference
#   gpu_summary.py      log tails and the benchmark lines quoted in the summary
from gpu_correctness import BF16_TOL, FP32_TOL, UPSTREAM, check_backend, check_line  # noqa: E402
from gpu_env import backends_info, cmd_out, environment_info, find_nvcc  # noqa: E402
from gpu_summary import bench_summary, log_tail, merge_bench_parts  # noqa: E402

STAGES = ("env", "build", "check", "tests", "qk", "bench", "e2e")
DEFAULT_STAGES = "env,check,bench,e2e"
GPU_TESTS = ("tests/test_build.py", "tests/test_cuda.py", "tests/test_triton.py", "tests/test_qk.py",
             "tests/test_compile.py")
SMOKE_TESTS = ("tests/test_build.py",)
EXPORTED = ("summary.txt", "environment.json", "check.json", "bench_results.json", "bench_table.md",
            "e2e.json")
TARBALL = "gpu_check_all.tar.gz"
# Seconds kept for the stages after a given one, so an early stage that runs long
# cannot starve them all, and for the last summary and export.
MIN_SECONDS = {"check": 60, "tests": 60, "qk": 60, "bench": 60, "e2e": 70}
QK_CAP_S = 180  # the QK-mode T sweep stops starting measurements before this
FINAL_RESERVE = 10


# ---------------------------------------------------------------- orchestration (parent)


class _Stopped(Exception):
    """SIGTERM / SIGINT arrived: stop, summarize and export what there is."""


class GpuCheck:
    def __init__(self, args: argparse.Namespace, stages: List[str]):
        self.args = args
        self.stages = stages
        self.smoke = args.smoke
        self.out = Path(args.out).resolve()
        self.export_dir = Path(args.export).resolve() if args.export else None
        if self.export_dir == self.out:
            self.export_dir = None
        self.start = time.time()
        self.deadline = self.start + args.deadline_s
        self.summary: List[str] = []
        self.current: Optional[subprocess.Popen] = None
        self.env_info: dict = {}
        self.status: dict = {}
        self.checks: Dict[str, list] = {}
        self.stage: Optional[str] = None  # the stage running now
        self.child_env = dict(os.environ)
        self.child_env["PYTHONUNBUFFERED"] = "1"
        if self.smoke:
            self.child_env["TRITON_INTERPRET"] = "1"
        else:
            self.child_env.pop("TRITON_INTERPRET", None)  # on a GPU the kernels must really compile
        # The package from this checkout, without installing it (scripts/gpu_check.sh sets
        # the same): the repository root for a2d_kernels, python/ for a2d_trainer.
        path = [str(ROOT), str(ROOT / "python")]
        if self.child_env.get("PYTHONPATH"):
            path.append(self.child_env["PYTHONPATH"])
        self.child_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))

    # ------------------------------------------------------------ time

    def left(self) -> float:
        return self.deadline - time.time()

    def reserve_after(self, stage: str) -> float:
        later = self.stages[self.stages.index(stage) + 1:] if stage in self.stages else []
        return FINAL_RESERVE + sum(MIN_SECONDS.get(s, 0) for s in later)

    def timeout_for(self, stage: str, cap: float, floor: float = 15.0) -> Optional[float]:
        """Seconds this step may take: ``cap``, less what the later stages need; None
        when less than ``floor`` is left (the step is skipped)."""
        t = min(cap, self.left() - self.reserve_after(stage))
        return t if t >= floor else None

    # ------------------------------------------------------------ output

    def say(self, line: str = "") -> None:
        print(line, flush=True)

    def note(self, line: str) -> None:
        """A summary line (printed now and again at the end)."""
        self.summary.append(line)
        self.say(line)

    def run(self, cmd: List[str], timeout: float, log: Path, echo: bool, env: Optional[dict] = None) -> Optional[int]:
        """Run a step in its own process group; output to ``log`` (and stdout if echo).

        Output is streamed by a reader thread, so a step that hangs silently is still
        killed at ``timeout`` with all its children, and what it printed is kept. The
        return code, or None when it was killed or could not start.
        """
        shown = " ".join(str(c) for c in cmd)
        self.say(f"$ {shown}  (timeout {timeout:.0f}s, log {log.name})")
        try:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=str(ROOT), env=env or self.child_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", start_new_session=True)
        except OSError as exc:
            self.say(f"  could not start: {exc}")
            return None
        self.current = proc
        with open(log, "w") as fh:
            fh.write(f"$ {shown}\n")

            def pump():
                for line in proc.stdout:
                    fh.write(line)
                    fh.flush()
                    if echo:
                        print(line, end="", flush=True)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                rc: Optional[int] = proc.wait(timeout=timeout)
                # Whatever the step left running (compile workers, a benchmark's child)
                # would hold the GPU during the next step and skew its timings.
                self._kill(proc)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                rc = None
                self.say(f"  step timed out after {timeout:.0f}s (killed with its children); see {log.name}")
            finally:
                if proc.poll() is None:  # _Stopped arrived while waiting
                    self._kill(proc)
                reader.join(timeout=10)
                self.current = None
        return rc

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def write_check_json(self) -> None:
        """check.json: every backend's rows so far (a check cut short included) and the
        environment they were measured in."""
        rows = {}
        for b in ("triton", "cuda"):
            try:
                rows[b] = json.loads((self.out / f"check_{b}.json").read_text())
            except (OSError, ValueError):
                continue
        if rows:
            (self.out / "check.json").write_text(json.dumps(
                {"environment": self.env_info, "tolerances": {"fp32": FP32_TOL, "bf16": BF16_TOL},
                 "upstream_gradient": UPSTREAM, "rows": rows}, indent=1))

    def export(self) -> None:
        """Write summary.txt; refresh the exported files (at most 7) and the tarball."""
        try:
            self.write_check_json()
        except OSError as exc:
            self.say(f"check.json not written: {exc}")
        text = "\n".join(self._final_lines()) + "\n"
        try:
            (self.out / "summary.txt").write_text(text)
        except OSError as exc:
            self.say(f"summary.txt not written: {exc}")
        if self.export_dir is None:
            return
        try:
            self.export_dir.mkdir(parents=True, exist_ok=True)
            sources = {"summary.txt": self.out / "summary.txt", "environment.json": self.out / "environment.json",
                       "check.json": self.out / "check.json", "bench_results.json": self.out / "bench" / "results.json",
                       "bench_table.md": self.out / "bench" / "table.md", "e2e.json": self.out / "e2e" / "e2e.json"}
            for name, src in sources.items():
                if src.is_file():
                    shutil.copyfile(src, self.export_dir / name)
            tmp = self.export_dir / (TARBALL + ".tmp")
            with tarfile.open(tmp, "w:gz") as tar:
                for path in sorted(self.out.rglob("*")):
                    # 4 MiB a file at most: the tarball must stay far under 16 MiB.
                    if path.is_file() and path.stat().st_size <= 4 * 1024 * 1024:
                        tar.add(path, arcname=str(Path(self.out.name) / path.relative_to(self.out)))
            os.replace(tmp, self.export_dir / TARBALL)
        except Exception as exc:  # noqa: BLE001 - exporting must never end the run
            self.say(f"export to {self.export_dir} failed: {type(exc).__name__}: {exc}")

    def _final_lines(self) -> List[str]:
        e = self.env_info
        head = (f"gpu_check {e.get('date_utc', '?')} | {e.get('device_name') or e.get('gpu_name') or 'no GPU'}"
                f" (cc {e.get('device_capability') or e.get('compute_cap')}) | driver {e.get('driver')}"
                f" | torch {e.get('torch')} (CUDA {e.get('torch_cuda')}) | triton {e.get('triton')}"
                f" | nvcc {e.get('nvcc_version')} | python {e.get('python')}"
                f" | sources {e.get('source_sha256_16')} commit {e.get('git_commit')}")
        stages = " ".join(f"{s}={self.status.get(s, 'not run')}" for s in self.stages)
        return [head, f"stages: {stages}", *self.summary,
                f"total {time.time() - self.start:.0f}s of a {self.args.deadline_s:.0f}s deadline; "
                f"everything is under {self.out}"
                + (f", exported to {self.export_dir}" if self.export_dir else "")]

    # ------------------------------------------------------------ stages

    def stage_env(self) -> None:
        t = self.timeout_for("env", 90)
        if t is None:
            self.status["env"] = "skipped (deadline)"
            return
        rc = self.run([sys.executable, __file__, "--out", str(self.out), "--env-info"], t,
                      self.out / "env.log", echo=False)
        try:
            self.env_info = json.loads((self.out / "environment.json").read_text())
        except (OSError, ValueError):
            self.env_info = {}
        with open(self.out / "environment.txt", "w") as fh:
            for cmd in (["nvidia-smi"], [self.env_info.get("nvcc") or "nvcc", "--version"],
                        [sys.executable, "-m", "pip", "list", "--disable-pip-version-check"]):
                fh.write(f"$ {' '.join(cmd)}\n{cmd_out(cmd, timeout=60) or '(failed)'}\n\n")
        self.status["env"] = "ok" if rc == 0 and self.env_info else f"FAILED (rc={rc}, see env.log)"
        e = self.env_info
        for key in ("torch_error", "triton_error"):
            if e.get(key):
                self.note(f"env: {key}: {e[key]}")
        if not self.smoke and not e.get("cuda_available"):
            self.note("env: torch sees no CUDA device (see environment.txt)")

    def stage_build(self) -> None:
        t = self.timeout_for("build", 300, floor=30)
        if t is None:
            self.status["build"] = "skipped (deadline)"
            return
        env = dict(self.child_env, A2D_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 4))
        nvcc = self.env_info.get("nvcc") or find_nvcc()
        if nvcc and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) \
                and shutil.which("nvcc") is None and nvcc != "/usr/local/cuda/bin/nvcc":
            # setup.py looks in CUDA_HOME, PATH and /usr/local/cuda only.
            env["CUDA_HOME"] = self.child_env["CUDA_HOME"] = os.path.dirname(os.path.dirname(nvcc))
            self.note(f"build: nvcc found at {nvcc}, not on PATH: CUDA_HOME={env['CUDA_HOME']}")
        if not self.env_info.get("setuptools_cxx_found", True) and shutil.which("g++"):
            env.update(CC="gcc", CXX="g++")
        cap = self.env_info.get("device_capability") or self.env_info.get("compute_cap")
        if not os.environ.get("A2D_CUDA_ARCHS") and cap and not self.smoke:
            env["A2D_CUDA_ARCHS"] = cap  # one target: the build takes a fraction of the default's time
        archs = env.get("A2D_CUDA_ARCHS", "setup.py's default")
        # A module left by an earlier build (a warm machine keeps ignored files) must not
        # pass for this one if this build fails.
        for old in (ROOT / "a2d_kernels").glob("_C.*.so"):
            old.unlink()
        began = time.time()
        rc = self.run([sys.executable, "setup.py", "build_ext", "--inplace"], t, self.out / "build.log",
                      echo=False, env=env)
        took = time.time() - began
        if rc == 0:
            self.status["build"] = "ok"
            self.note(f"build: ok in {took:.0f}s (A2D_BUILD_CUDA=1, archs {archs}, nvcc {nvcc})")
        else:
            self.status["build"] = "FAILED"
            self.note(f"build: FAILED (rc={rc}) after {took:.0f}s, archs {archs}, nvcc {nvcc}; "
                      f"the Triton checks still run. build.log, error lines:")
            for line in log_tail(self.out / "build.log", 15, prefer=("error", "fatal", "not found", "failed",
                                                                     "cannot", "undefined", "no such")):
                self.note("  | " + line)

    def query_backends(self) -> Dict[str, Optional[str]]:
        """{backend: None if available else the reason}, asked in a child."""
        t = self.timeout_for("check" if "check" in self.stages else "bench", 120)
        if t is None:
            return {}
        rc = self.run([sys.executable, __file__, "--out", str(self.out), "--backends-info"]
                      + (["--smoke"] if self.smoke else []), t, self.out / "backends.log", echo=False)
        try:
            info = json.loads((self.out / "backends.json").read_text())
        except (OSError, ValueError):
            self.note(f"backends: could not be queried (rc={rc}); see backends.log:")
            for line in log_tail(self.out / "backends.log", 8):
                self.note("  | " + line)
            return {}
        status = {k: (None if v["available"] else v["reason"]) for k, v in info["backends"].items()}
        self.note("backends: " + ", ".join(f"{k} {'available' if v is None else 'UNAVAILABLE (' + v + ')'}"
                                           for k, v in status.items()))
        self.note(f"extension: {json.dumps(info.get('extension'))}"[:400])
        for what, path in (("a2d_kernels", info.get("package")),
                           ("a2d_kernels._C", (info.get("extension") or {}).get("file")
                            if isinstance(info.get("extension"), dict) else None)):
            if path and not str(Path(path).resolve()).startswith(str(ROOT) + os.sep):
                self.note(f"WARNING: {what} was imported from {path}, not from this checkout ({ROOT})")
        return status

    def _clear(self, *patterns: str) -> None:
        """Remove results an earlier run left in --out, so that they never pass for this one's."""
        for pattern in patterns:
            for path in self.out.glob(pattern):
                if path.is_file():
                    path.unlink()

    def stage_check(self, status: Dict[str, Optional[str]]) -> None:
        self._clear("check.json", "check_*.json")
        fused = [b for b in ("triton", "cuda") if b in status and status[b] is None]
        for b in ("triton", "cuda"):
            if b not in fused:
                self.note(f"check {b}: skipped ({status.get(b, 'backends() not known')})")
        results = []
        for i, b in enumerate(fused):
            # The other backend's check keeps a minimum too.
            t = self.timeout_for("check", 150 if b == "triton" else 100)
            if t is not None:
                t = min(t, self.left() - self.reserve_after("check") - 40 * (len(fused) - 1 - i))
            if t is None or t < 15:
                self.note(f"check {b}: skipped (deadline)")
                results.append(False)
                continue
            rc = self.run([sys.executable, __file__, "--out", str(self.out), "--check-backend", b]
                          + (["--smoke"] if self.smoke else []), t, self.out / f"check_{b}.log", echo=True)
            path = self.out / f"check_{b}.json"
            rows = json.loads(path.read_text()) if path.exists() else []
            self.checks[b] = rows
            n_pass = sum(bool(r["pass"]) for r in rows)
            ok = bool(rows) and n_pass == len(rows) and rc == 0
            results.append(ok)
            self.note(f"check {b}: {n_pass}/{len(rows)} cases pass, rc={rc}: {'ALL PASS' if ok else 'FAILURES'}")
            failed = [r for r in rows if not r["pass"]]
            for r in failed[:8]:
                self.note("  " + check_line(r)[:240])
            if len(failed) > 8:
                self.note(f"  ... {len(failed) - 8} more in check_{b}.log")
            if rc != 0 and not rows or rc is None:
                for line in log_tail(self.out / f"check_{b}.log", 6):
                    self.note("  | " + line)
        self.write_check_json()
        self.status["check"] = ("ok" if results and all(results) else "no fused backend" if not fused
                                else "FAILED")

    def stage_tests(self) -> None:
        t = self.timeout_for("tests", 180, floor=30)
        if t is None:
            self.status["tests"] = "skipped (deadline)"
            return
        files = [f for f in (SMOKE_TESTS if self.smoke else GPU_TESTS) if (ROOT / f).exists()]
        # -v: one line per test as it ends, so a run killed at its timeout still says
        # which tests passed, which failed and where it stopped.
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE",
               f"--junitxml={self.out / 'gpu_tests.xml'}"]
        extras = []
        if importlib.util.find_spec("xdist") is not None and not self.smoke:
            # One process per test file, four at a time: Triton's and inductor's
            # compilations overlap (a test file's own cases stay in order).
            cmd += ["-n", "4", "--dist", "loadfile"]
            extras.append("xdist -n 4")
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd += ["--timeout", "150"]
            extras.append("150 s a test")
        began = time.time()
        rc = self.run(cmd + files, t, self.out / "gpu_tests.log", echo=False)
        lines = log_tail(self.out / "gpu_tests.log", 100000)
        result = next((ln for ln in reversed(lines) if ln.startswith("=") and " in " in ln and any(
            w in ln for w in ("passed", "failed", "error", "skipped", "no tests"))), None)
        if result is None:  # killed before pytest's own summary: count the -v lines
            counts = {w: sum(f" {w}" in ln and "::" in ln for ln in lines)
                      for w in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
            result = ("no pytest summary; per-test lines so far: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                      + (f"; last line: {lines[-1][:160]}" if lines else ""))
        self.status["tests"] = "ok" if rc == 0 else ("TIMED OUT" if rc is None else "FAILED")
        self.note(f"tests ({', '.join(extras) or 'serial'}; {time.time() - began:.0f}s): rc={rc}: {result.strip('= ')}")
        bad = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        if not bad:  # no short summary (killed): the failing tests' own -v lines
            bad = [ln for ln in lines if "::" in ln and (" FAILED" in ln or " ERROR" in ln)]
        for ln in bad[:15]:
            self.note("  " + ln[:200])
        if len(bad) > 15:
            self.note(f"  ... {len(bad) - 15} more in gpu_tests.log")

    def stage_bench(self) -> None:
        t = self.timeout_for("bench", 1e9, floor=40)
        if t is None:
            self.status["bench"] = "skipped (deadline)"
            self.note("benchmark: skipped (deadline)")
            return
        # bench_a2d lets the contender running at the budget's end overrun it by up to
        # 60 s, and starts, merges and plots around the contenders.
        budget = max(20.0, t - 80)
        self._clear("bench/results.json", "bench/table.md", "bench/parts/*/results.json")
        cmd = [sys.executable, str(HERE / "bench_a2d.py"), "--isolate", "--out", str(self.out / "bench"),
               "--budget-s", f"{budget:.0f}", "--warmup", "3", "--reps", "20", "--target-s", "0.25",
               "--table", "summary"]
        rc = self.run(cmd, t, self.out / "bench.log", echo=True)
        self.status["bench"] = "ok" if rc == 0 else ("TIMED OUT" if rc is None else "FAILED")
        self.note(f"benchmark: rc={rc}, budget {budget:.0f}s, results in {self.out / 'bench'}")
        results = self.out / "bench" / "results.json"
        if not results.exists():
            results = merge_bench_parts(self.out / "bench")
            if results is not None:
                self.note(f"benchmark: no merged results.json; summarizing the contenders' parts ({results.name})")
        for line in bench_summary(results) if results is not None else ["  no benchmark results"]:
            self.note(line)

    def stage_qk(self) -> None:
        t = self._stage_time("qk", "qk sweep", QK_CAP_S, floor=40)
        if t is None:
            return
        self._clear("qk/qk_results.json", "qk/qk_table.md")
        # bench_qk finishes the measurement running at its budget's end (up to --slow-s
        # per call, a few calls) and then writes its table.
        cmd = [sys.executable, str(HERE / "bench_qk.py"), "--out", str(self.out / "qk"),
               "--budget-s", f"{max(15.0, t - 60):.0f}"] + (["--smoke"] if self.smoke else [])
        self._run_script_stage("qk", "qk sweep", cmd, t, self.out / "qk" / "qk_table.md")

    def stage_e2e(self) -> None:
        t = self._stage_time("e2e", "e2e", 1e9, floor=30)
        if t is None:
            return
        self._clear("e2e/e2e.json", "e2e/e2e.md")
        cmd = [sys.executable, str(HERE / "bench_e2e.py"), "--out", str(self.out / "e2e"),
               "--budget-s", f"{max(15.0, t - 25):.0f}"]
        self._run_script_stage("e2e", "e2e", cmd, t, self.out / "e2e" / "e2e.md")

    def _stage_time(self, stage: str, label: str, cap: float, floor: float) -> Optional[float]:
        """``timeout_for``, and the stage marked skipped when nothing is left for it."""
        t = self.timeout_for(stage, cap, floor=floor)
        if t is None:
            self.status[stage] = "skipped (deadline)"
            self.note(f"{label}: skipped (deadline)")
        return t

    def _run_script_stage(self, stage: str, label: str, cmd: List[str], t: float, table: Path) -> None:
        """Run a benchmark script as ``stage``; quote its Markdown table in the summary, or
        the tail of its log when it failed before writing one."""
        log = self.out / f"{stage}.log"
        rc = self.run(cmd, t, log, echo=True)
        self.status[stage] = "ok" if rc == 0 else ("TIMED OUT" if rc is None else "FAILED")
        self.note(f"{label}: rc={rc}, results in {table.parent}")
        if table.exists():
            self.note(table.read_text().rstrip())
        elif rc != 0:
            for line in log_tail(log, 6):
                self.note("  | " + line)

    def main(self) -> None:
        self.say(f"gpu_check: stages {','.join(self.stages)}, deadline {self.args.deadline_s:.0f}s, "
                 f"out {self.out}" + (f", export {self.export_dir}" if self.export_dir else "")
                 + (" (smoke: no GPU needed)" if self.smoke else ""))
        steps = [("env", self.stage_env), ("build", self.stage_build)]
        for name, fn in steps:
            if name in self.stages:
                self._guarded(name, fn)
        status: Dict[str, Optional[str]] = {}
        if any(s in self.stages for s in ("check", "bench", "e2e")):
            try:
                status = self.query_backends()
            except _Stopped:
                raise
            except Exception as exc:  # noqa: BLE001
                self.note(f"backends: query crashed: {type(exc).__name__}: {exc}")
            self.export()
        for name, fn in (("check", lambda: self.stage_check(status)), ("tests", self.stage_tests),
                         ("qk", self.stage_qk), ("bench", self.stage_bench), ("e2e", self.stage_e2e)):
            if name in self.stages:
                self._guarded(name, fn)

    def _guarded(self, name: str, fn) -> None:
        """Run a stage; a crash of this script's own code costs that stage only."""
        began = time.time()
        self.stage = name
        try:
            fn()
        except _Stopped:
            self.status[name] = "STOPPED (signal)"
            raise
        except Exception as exc:  # noqa: BLE001
            self.status[name] = f"CRASHED ({type(exc).__name__})"
            self.note(f"{name}: gpu_check crashed in this stage: {type(exc).__name__}: {exc}")
        self.stage = None
        self.status.setdefault(name, "done")
        self.say(f"[{name}: {self.status[name]}, {time.time() - began:.0f}s; {self.left():.0f}s left]")
        self.export()


def _on_signal(signum, _frame):
    raise _Stopped(signal.Signals(signum).name)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("A2D_BENCH_OUT") or os.environ.get("OUT"),
                   help="output folder (default $A2D_BENCH_OUT, then $OUT)")
    p.add_argument("--export", default=None,
                   help="also keep at most 7 files here, refreshed after every stage (the device tool's $OUT)")
    p.add_argument("--stages", default=DEFAULT_STAGES, help=f"comma-separated from {','.join(STAGES)}, or 'all'")
    p.add_argument("--deadline-s", "--budget-s", dest="deadline_s", type=float, default=450,
                   help="seconds for all stages together, from this program's start")
    p.add_argument("--smoke", action="store_true", help="no GPU needed: check the orchestration itself")
    p.add_argument("--skip-check", action="store_true", help="drop the check stage")
    p.add_argument("--skip-e2e", action="store_true", help="drop the e2e stage")
    p.add_argument("--check-backend", default=None, help=argparse.SUPPRESS)  # child modes
    p.add_argument("--env-info", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backends-info", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out is required (or set A2D_BENCH_OUT / OUT)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.env_info:
        info = environment_info()
        (out / "environment.json").write_text(json.dumps(info, indent=1, default=str))
        print(json.dumps(info, indent=1, default=str))
        return 0
    if args.backends_info:
        info = backends_info(args.smoke)
        (out / "backends.json").write_text(json.dumps(info, indent=1, default=str))
        print(json.dumps(info, indent=1, default=str))
        return 0
    if args.check_backend:
        if args.smoke:
            import cases

            rows = check_backend(args.check_backend, out, device="cpu", shapes=cases.smoke_plan()[:1])
        else:
            rows = check_backend(args.check_backend, out)
        return 0 if rows and all(r["pass"] for r in rows) else 1

    stages = list(STAGES) if args.stages.strip() == "all" else [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    stages = [s for s in STAGES if s in stages and not (s == "check" and args.skip_check)
              and not (s == "e2e" and args.skip_e2e)]
    run = GpuCheck(args, stages)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        run.main()
    except _Stopped as exc:
        if run.current is not None:
            run._kill(run.current)
        if run.stage:
            run.status[run.stage] = "STOPPED (signal)"
        run.note(f"stopped by {exc} after {time.time() - run.start:.0f}s"
                 + (f" in stage {run.stage}" if run.stage else "") + ": the later stages did not run")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the summary and the export must finish
    run.export()
    print("\n==== gpu_check summary ====", flush=True)
    for line in run._final_lines():
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
