"""Environment facts for ``gpu_check.py``: what the results depend on, and where nvcc is.

``environment_info`` (the ``env`` stage, ``environment.json``) and ``backends_info``
(which backends ``a2d_kernels`` offers here, ``backends.json``) run in child processes
(``gpu_check.py --env-info`` / ``--backends-info``): they import torch, the
orchestrator does not. ``find_nvcc`` and ``cmd_out`` are also used by the orchestrator
itself (the ``build`` stage, ``environment.txt``).
"""
from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


def cmd_out(cmd: Sequence[str], timeout: float = 30) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
        return (out.stdout + out.stderr).strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def find_nvcc() -> Optional[str]:
    """nvcc as setup.py finds it (CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda), then the
    other places a CUDA toolkit is installed: /usr/local/cuda-*, /opt/cuda, pip's nvidia
    wheels."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    candidates += ["/opt/cuda/bin/nvcc", "/usr/bin/nvcc"]
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", "nvcc")), reverse=True)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _cudart_static(nvcc: Optional[str]) -> Optional[str]:
    if not nvcc:
        return None
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    dry = cmd_out([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
    for line in (dry or "").splitlines():
        if line.startswith("#$ TOP="):
            roots.insert(0, line.split("=", 1)[1].strip())
    for root in roots:
        for sub in ("lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "lib"):
            path = os.path.join(root, sub, "libcudart_static.a")
            if os.path.isfile(path):
                return os.path.normpath(path)
    return None


def _source_hash() -> str:
    """sha256 over the sources that decide the results (works without .git)."""
    h = hashlib.sha256()
    files = [ROOT / "setup.py"]
    for pattern in ("a2d_kernels/**/*.py", "csrc/*", "benchmarks/*.py", "tests/*.py", "python/**/*.py"):
        files += sorted(ROOT.glob(pattern))
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def environment_info() -> dict:
    """Everything the results depend on; runs in a child (it imports torch)."""
    info: Dict[str, object] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "source_sha256_16": _source_hash(),
        "git_commit": os.environ.get("A2D_COMMIT") or cmd_out(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
    }
    smi = cmd_out(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                    "--format=csv,noheader"])
    info["nvidia_smi"] = smi
    if smi:
        parts = [p.strip() for p in smi.splitlines()[0].split(",")]
        if len(parts) >= 4:
            info["gpu_name"], info["driver"], info["gpu_memory"], info["compute_cap"] = parts[:4]
    nvcc = find_nvcc()
    info["nvcc"] = nvcc
    version = cmd_out([nvcc, "--version"]) if nvcc else None
    info["nvcc_version"] = version.splitlines()[-1] if version else None
    info["cudart_static"] = _cudart_static(nvcc)
    cxx = (sysconfig.get_config_var("CXX") or "c++").split()[0]
    info["setuptools_cxx"] = cxx
    info["setuptools_cxx_found"] = shutil.which(cxx)
    gcc = cmd_out(["gcc", "--version"])
    info["gcc"] = gcc.splitlines()[0] if gcc else None
    info["python_h"] = os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    info["ninja"] = shutil.which("ninja")
    from importlib import metadata

    versions = {}
    for dist in ("torch", "triton", "numpy", "pybind11", "ninja", "setuptools", "wheel", "pip", "pytest",
                 "pytest-xdist", "pytest-timeout", "pytest-benchmark", "matplotlib", "transformers",
                 "sentencepiece", "sacrebleu", "tqdm", "liger-kernel"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    info["packages"] = versions
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["device_name"] = props.name
            info["device_capability"] = f"{props.major}.{props.minor}"
            info["sm_count"] = props.multi_processor_count
            info["device_memory_bytes"] = int(props.total_memory)
            info["l2_cache_bytes"] = int(getattr(props, "L2_cache_size", 0))
            info["device_count"] = torch.cuda.device_count()
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = None
        info["triton_error"] = f"{type(exc).__name__}: {exc}"
    return info


def backends_info(smoke: bool) -> dict:
    """What ``a2d_kernels.backends()`` says on this machine, and the extension's own view."""
    import torch

    import a2d_kernels
    from a2d_kernels import backends

    device = torch.device("cuda") if torch.cuda.is_available() and not smoke else torch.device("cpu")
    info: Dict[str, object] = {"device": str(device), "backends": backends(device),
                               "package": a2d_kernels.__file__}
    try:
        from a2d_kernels import _C

        ext = {"file": _C.__file__, "cuda_archs": _C.cuda_archs, "runtime_version": _C.runtime_version(),
               "driver_version": _C.driver_version()}
        if device.type == "cuda":
            ext["device_problem"] = _C.device_problem(0) or None
        info["extension"] = ext
    except Exception as exc:  # noqa: BLE001
        info["extension"] = f"not importable: {type(exc).__name__}: {exc}"
    return info


# ---------------------------------------------------------------- orchestration (parent)
