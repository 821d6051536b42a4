"""Compile the A2D Triton kernels for a GPU target without a GPU, and report their
resources (registers, spill stack, shared memory).

The CPU interpreter runs the kernels' arithmetic but not the compiler: code that
only the real compiler rejects (a mixed-type early return, a layout it cannot
lower) or a tile plan that spills or needs more shared memory than the GPU has
would pass every interpreter test. This drives the real host code
(``triton_a2d.forward`` / ``backward``) on ``meta`` tensors with each kernel
launch replaced by ``triton.compile`` for the target, so exactly the launches the
host would make are compiled, with the tile plan it would choose.

    python -m a2d_kernels.ops._triton_compile_check          # table, sm_90
    python -m a2d_kernels.ops._triton_compile_check --json   # for tests

Must run in a process without TRITON_INTERPRET=1 (the kernels must be compiled
``JITFunction`` objects, not interpreted ones).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import tempfile
from typing import Dict, List

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..problem import make_problem
from . import triton_a2d

# Largest dynamic shared memory one block may use on sm_90 (H100), bytes.
SM90_MAX_SHARED = 232448

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.uint8: "u8", torch.float64: "fp64"}

# name: (B, T, K, student heads per layer, teacher heads per layer), the issue's
# realistic shapes (T = K shortened: tile plans do not depend on the length
# beyond the key block, and nothing is allocated on meta tensors anyway).
SHAPES = {
    "iwslt": (64, 64, 64, (4, 4, 4), (4,) * 6),
    "wmt": (32, 128, 128, (8,) * 6, (16,) * 6),
}


def _signature_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, (tuple, list)):
        return tuple(_signature_type(v) for v in value)
    raise TypeError(f"no Triton signature type for {type(value).__name__}")


def _cubin_resources(cubin: bytes) -> Dict[str, int]:
    """Registers and stack frame from the cuobjdump shipped with Triton (if any)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(m.group(1)), "stack": int(m.group(2))} if m else {}


class _CompileInsteadOfLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)``
    compiles for ``target`` and records the resources instead of launching."""

    def __init__(self, kernel, target, records: List[dict], label: str):
        self.kernel, self.target, self.records, self.label = kernel, target, records, label

    def __getitem__(self, grid):
        def compile_launch(*args, num_warps=4, **constexprs):
            params = list(inspect.signature(self.kernel.fn).parameters)
            bound = dict(zip(params, args))
            signature = {p: "constexpr" if p in constexprs else _signature_type(bound[p]) for p in params}
            compiled = triton.compile(ASTSource(self.kernel, signature, constexprs), target=self.target,
                                      options={"num_warps": num_warps})
            self.records.append({
                "case": self.label, "kernel": self.kernel.fn.__name__, "num_warps": num_warps,
                "tile": (f"{constexprs.get('CT_PAD')}x"
                         f"{constexprs.get('BLOCK_T', 1) * constexprs.get('BLOCK_K', 1)}"),
                "shared": compiled.metadata.shared, **_cubin_resources(compiled.asm["cubin"]),
            })
        return compile_launch


def check(arch: int = 90, shapes=SHAPES, dtypes=(torch.float32, torch.bfloat16)) -> List[dict]:
    if triton_a2d.INTERPRETED:
        raise RuntimeError("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")
    target = GPUTarget("cuda", arch, 32)
    records: List[dict] = []
    names = ("map_forward_partials", "map_forward_combine", "row_forward", "a2d_backward")
    originals = {n: getattr(triton_a2d, n) for n in names}
    try:
        for shape_name, (B, T, K, s_heads, t_heads) in shapes.items():
            for dtype in dtypes:
                for normalize in ("map", "row"):
                    label = f"{shape_name}/{str(dtype).replace('torch.', '')}/{normalize}"
                    for n in names:
                        setattr(triton_a2d, n, _CompileInsteadOfLaunch(originals[n], target, records, label))
                    student = [torch.empty(B, h, T, K, dtype=dtype, device="meta") for h in s_heads]
                    teacher = [torch.empty(B, h, T, K, dtype=dtype, device="meta") for h in t_heads]
                    Cs, Ct = sum(s_heads), sum(t_heads)
                    mask = torch.zeros(B, K, dtype=torch.bool, device="meta")
                    problem = make_problem(student, teacher, torch.empty(Ct, Cs, device="meta"),
                                           torch.empty(Ct, device="meta"), normalize=normalize,
                                           key_padding_mask=mask)
                    _, saved = triton_a2d.forward(problem)
                    triton_a2d.backward(problem, saved, torch.empty((), device="meta"), True)
    finally:
        for n, kernel in originals.items():
            setattr(triton_a2d, n, kernel)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    records = check(args.arch)
    if args.json:
        print(json.dumps(records))
        return
    for r in records:
        print(f"{r['case']:22s} {r['kernel']:22s} warps {r['num_warps']} tile {r['tile']:7s} "
              f"regs {r.get('registers', '?'):>3} stack {r.get('stack', '?'):>5} shared {r['shared']}")


if __name__ == "__main__":
    main()
