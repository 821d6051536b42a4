"""Build script. The pure-Python package always installs; the optional CUDA extension
``a2d_kernels._C`` is built from ``csrc/`` when nvcc is found.

Environment:
  A2D_BUILD_CUDA   "0" skip the extension; "1" build it or fail; unset/"auto": build it
                   when nvcc is found, otherwise print one line and install without it.
  A2D_CUDA_ARCHS   target GPUs, TORCH_CUDA_ARCH_LIST style: "8.0;8.6;8.9;9.0+PTX"
                   (the default), "90", "sm_90a", ... ("+PTX" also embeds PTX for newer GPUs).
                   Unset: TORCH_CUDA_ARCH_LIST is used when set (what PyTorch extension
                   builds read), else the default.
  CUDA_HOME / CUDA_PATH   toolkit location (else nvcc on PATH, else /usr/local/cuda).
  MAX_JOBS         parallel compile jobs (default: CPU count); NVCC_THREADS: nvcc --threads.

The .cu files are compiled by nvcc into objects (through ninja when it is installed),
then setuptools compiles the C++ files with the host compiler and links everything with
the static CUDA runtime. torch is not imported here and libtorch is not linked: the
module takes raw pointers, so it does not depend on the installed torch's ABI.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
EXT_NAME = "a2d_kernels._C"
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
CUDA_SOURCES = ["csrc/a2d_kernels.cu"]
HOST_SOURCES = ["csrc/bindings.cpp", "csrc/a2d_host.cpp"]
DEPENDS = ["csrc/a2d_tile.cuh", "csrc/a2d_api.h"]


def say(message):
    print(f"a2d-kernels: {message}", file=sys.stderr, flush=True)


def build_mode():
    mode = os.environ.get("A2D_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto", ""):
        raise SystemExit(f"A2D_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    return mode or "auto"


def find_nvcc():
    """nvcc from CUDA_HOME / CUDA_PATH, else PATH, else /usr/local/cuda; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            candidate = os.path.join(root, "bin", "nvcc")
            if os.path.isfile(candidate):
                return candidate
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    fallback = "/usr/local/cuda/bin/nvcc"
    return fallback if os.path.isfile(fallback) else None


def cuda_library_dir(nvcc):
    """Directory holding libcudart_static.a, asked from nvcc itself (nvcc may be a wrapper)."""
    roots = []
    try:
        dry = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, check=False).stderr
        match = re.search(r"^#\$ TOP=(.*)$", dry, re.MULTILINE)
        if match:
            roots.append(match.group(1).strip())
    except OSError:
        pass
    roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in roots:
        for sub in ("lib64", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib"), "lib"):
            lib = os.path.normpath(os.path.join(root, sub))
            if os.path.isfile(os.path.join(lib, "libcudart_static.a")):
                return lib
    raise RuntimeError(f"libcudart_static.a not found next to {nvcc}")


def target_archs(environ=os.environ):
    """(arch list, the variable it came from): A2D_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST,
    else the default."""
    for var in ("A2D_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if environ.get(var, "").strip():
            return environ[var], var
    return DEFAULT_ARCHS, "the default arch list"


def parse_archs(spec, source="A2D_CUDA_ARCHS"):
    """'8.0;8.6;9.0+PTX' / '80 86 90' / 'sm_90a' -> nvcc -gencode flags. ``source``
    names the variable the list came from, for the error message."""
    flags = []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        ptx = token.upper().endswith("+PTX")
        name = token[:-4] if ptx else token
        name = re.sub(r"^(sm_|compute_)", "", name).replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", name):
            raise SystemExit(f"{source}: cannot read {token!r} (in {spec!r}); use numeric arches, "
                             "e.g. '8.0;8.6;9.0+PTX'")
        flags.append(f"-gencode=arch=compute_{name},code=sm_{name}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{name},code=compute_{name}")
    if not flags:
        raise SystemExit(f"{source} is empty")
    return flags


def max_jobs():
    return max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))


class BuildCudaExt(build_ext):
    """Compile the .cu sources with nvcc, then let setuptools build and link the rest."""

    def build_extensions(self):
        self._not_built = set()
        super().build_extensions()
        # A skipped extension must not stay listed: setuptools would then copy its missing
        # file (an editable install, `pip install -e .`, failed with "can't copy ... _C...so").
        self.extensions = [ext for ext in self.extensions if ext.name not in self._not_built]

    def build_extension(self, ext):
        if ext.name != EXT_NAME:
            return super().build_extension(ext)
        forced = build_mode() == "1"
        try:
            self._build_cuda_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
            if forced:
                raise
            self._not_built.add(ext.name)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            say(f"CUDA extension not built ({reason}); the Triton and reference backends "
                "still work. Set A2D_BUILD_CUDA=1 to make this an error.")

    def _build_cuda_extension(self, ext):
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
        import pybind11  # a build requirement (pyproject.toml); imported only when building

        archs, source = target_archs()
        gencode = parse_archs(archs, source)
        defines = [f'-DA2D_CUDA_ARCHS="{archs}"']
        objects = self._compile_cuda(nvcc, gencode)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        ext.include_dirs = list(ext.include_dirs or []) + [pybind11.get_include(), os.path.join(HERE, CSRC)]
        ext.extra_compile_args = ["-std=c++17", "-O3", "-fvisibility=hidden", *defines]
        ext.library_dirs = [cuda_library_dir(nvcc)]
        ext.libraries = ["cudart_static", "rt", "pthread", "dl"]
        super().build_extension(ext)
        say(f"built {EXT_NAME} with {nvcc} for {archs}")

    def _compile_cuda(self, nvcc, gencode):
        out_dir = os.path.join(os.path.abspath(self.build_temp), "cuda")
        os.makedirs(out_dir, exist_ok=True)
        threads = os.environ.get("NVCC_THREADS", "2")
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                 f"--threads={threads}", f"-I{os.path.join(HERE, CSRC)}", *gencode]
        jobs = []
        for src in CUDA_SOURCES:
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            jobs.append((os.path.join(HERE, src), obj))
        say(f"compiling {len(jobs)} CUDA source(s) with {nvcc} ({len(gencode)} targets)")
        if shutil.which("ninja"):
            self._run_ninja(nvcc, flags, jobs, out_dir)
        else:
            with ThreadPoolExecutor(max_jobs()) as pool:
                for (src, _), result in zip(jobs, pool.map(lambda job: subprocess.run(
                        [nvcc, *flags, "-c", job[0], "-o", job[1]], capture_output=True, text=True), jobs)):
                    if result.returncode != 0:
                        print(result.stdout + result.stderr, file=sys.stderr)
                        raise RuntimeError(f"nvcc failed on {os.path.relpath(src, HERE)} (output above)")
        return [obj for _, obj in jobs]

    def _run_ninja(self, nvcc, flags, jobs, out_dir):
        headers = " ".join(os.path.join(HERE, h) for h in DEPENDS)
        lines = [
            "ninja_required_version = 1.3",
            f"rule nvcc\n  command = {shlex.quote(nvcc)} {' '.join(shlex.quote(f) for f in flags)} -c $in -o $out",
            "  description = nvcc $in",
        ]
        lines += [f"build {obj}: nvcc {src} | {headers}" for src, obj in jobs]
        build_file = os.path.join(out_dir, "build.ninja")
        with open(build_file, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        result = subprocess.run(["ninja", "-f", build_file, "-j", str(max_jobs())],
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout + result.stderr, file=sys.stderr)
            raise RuntimeError("nvcc failed (compiler output above)")


def extensions():
    if build_mode() == "0":
        say("A2D_BUILD_CUDA=0: skipping the CUDA extension")
        return []
    return [Extension(EXT_NAME, sources=HOST_SOURCES, depends=DEPENDS + CUDA_SOURCES, language="c++")]


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildCudaExt})
