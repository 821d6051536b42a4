"""The CUDA extension's build: it must not fail silently where nvcc exists.

``setup.py`` installs without the extension when nvcc is missing or the optional build
fails (one line on stderr). On a machine with nvcc (CI has one) that would hide a broken
build behind skipped tests, so this checks that ``a2d_kernels._C`` was really built,
that it does not link libtorch or the shared CUDA runtime, and that the default target
architectures are ones the installed nvcc supports.
"""
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("a2d_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


setup_py = _setup_module()
NVCC = setup_py.find_nvcc()
BUILD_WANTED = os.environ.get("A2D_BUILD_CUDA", "auto") != "0"
needs_nvcc = pytest.mark.skipif(NVCC is None or not BUILD_WANTED, reason="no nvcc (or A2D_BUILD_CUDA=0)")


@needs_nvcc
def test_extension_was_built():
    from a2d_kernels import _C  # an ImportError here means the optional build failed

    assert _C.cuda_archs, "the extension should record the architectures it was built for"
    assert _C.runtime_version() >= 11000


@needs_nvcc
@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_extension_links_neither_libtorch_nor_shared_cudart():
    from a2d_kernels import _C

    deps = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in deps and "libc10" not in deps
    assert "libcudart.so" not in deps  # the static runtime is linked in


@needs_nvcc
def test_default_archs_are_supported_by_nvcc():
    listed = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    for flag in setup_py.parse_archs(setup_py.DEFAULT_ARCHS):
        arch = flag.split("arch=")[1].split(",")[0]
        assert arch in listed, f"{arch} is not supported by {NVCC}"


def test_arch_list_parsing():
    assert setup_py.parse_archs("8.0;9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert setup_py.parse_archs("sm_90a 86") == [
        "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_86,code=sm_86"]
    with pytest.raises(SystemExit, match="A2D_CUDA_ARCHS"):
        setup_py.parse_archs("volta")
    with pytest.raises(SystemExit, match="TORCH_CUDA_ARCH_LIST: cannot read 'Ampere'"):
        setup_py.parse_archs("8.0;Ampere", "TORCH_CUDA_ARCH_LIST")


def test_arch_list_comes_from_a2d_then_torch_variable_then_default():
    assert setup_py.target_archs({}) == (setup_py.DEFAULT_ARCHS, "the default arch list")
    assert setup_py.target_archs({"TORCH_CUDA_ARCH_LIST": "9.0"}) == ("9.0", "TORCH_CUDA_ARCH_LIST")
    both = {"TORCH_CUDA_ARCH_LIST": "9.0", "A2D_CUDA_ARCHS": "8.0"}
    assert setup_py.target_archs(both) == ("8.0", "A2D_CUDA_ARCHS")
    assert setup_py.target_archs({"A2D_CUDA_ARCHS": " ", "TORCH_CUDA_ARCH_LIST": "8.6"})[0] == "8.6"


def test_install_without_nvcc_skips_the_extension(tmp_path, monkeypatch):
    """No nvcc: build_ext --inplace (what an editable install runs) succeeds without
    ``_C`` instead of failing to copy the extension it never built."""
    from setuptools import Distribution

    (tmp_path / "a2d_kernels").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(setup_py, "find_nvcc", lambda: None)
    monkeypatch.setenv("A2D_BUILD_CUDA", "auto")
    dist = Distribution({"name": "a2d-kernels", "ext_modules": setup_py.extensions(),
                         "cmdclass": {"build_ext": setup_py.BuildCudaExt}})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.ensure_finalized()
    cmd.run()
    assert cmd.extensions == [] and cmd.get_outputs() == []
    assert not list((tmp_path / "a2d_kernels").glob("_C*"))
