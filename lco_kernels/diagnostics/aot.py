"""Compile every kernel configuration the API can launch ahead of time, for real GPUs, without one.

For each kernel × logits dtype × (BLOCK_V, num_warps) from ``launch_config`` × target (sm_80,
sm_90) × alignment (pointers, strides and V divisible by 16 — the usual case, e.g. V = 151936 —
or no such promise), ``triton.compile`` with an explicit ``GPUTarget`` gives a cubin that
``cuobjdump`` (shipped in the triton wheel) reads for registers, stack, local-memory spills
(STL/LDL instructions), shared memory and 128-bit global loads (LDG.E.128).

``python -m lco_kernels.diagnostics.aot`` prints the report as JSON. ``run_report()`` runs that in
a subprocess with TRITON_INTERPRET unset, so it works from interpreted test sessions too.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

_TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TARGETS = (80, 90)


def _signatures(kernel_name, ptr_type):
    """Argument types as the launcher passes them (small ints are i32, hyperparameters fp32)."""
    if kernel_name == "_lco_forward_kernel":
        return {"logits_ptr": ptr_type, "stride_lb": "i32", "stride_lt": "i32", "T": "i32",
                "labels_ptr": "*i64", "adv_ptr": "*fp32",
                "loss_ptr": "*fp32", "alpha_ptr": "*fp32", "lse_excl_ptr": "*fp32",
                "V": "i32", "rho_pos": "fp32", "rho_neg": "fp32", "ignore_index": "i32",
                "BLOCK_V": "constexpr"}
    return {"logits_ptr": ptr_type, "stride_lb": "i32", "stride_lt": "i32",
            "grad_ptr": ptr_type, "stride_gb": "i32", "stride_gt": "i32", "T": "i32",
            "labels_ptr": "*i64", "coef_ptr": "*fp32", "lse_excl_ptr": "*fp32",
            "V": "i32", "BLOCK_V": "constexpr"}


def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(kernel, dtype, block_v, num_warps, arch, aligned):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = _signatures(kernel.__name__, "*" + _TRITON_TYPE[dtype])
    names = list(signature)
    aligned_args = [n for n in names if n.endswith("_ptr") or n.startswith("stride_") or n == "V"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned_args} if aligned else {}
    src = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK_V": block_v}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout

    def usage(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else None

    return {
        "kernel": kernel.__name__, "dtype": str(dtype).replace("torch.", ""), "BLOCK_V": block_v,
        "num_warps": num_warps, "arch": f"sm_{arch}", "aligned": aligned,
        "registers": usage("REG"), "stack": usage("STACK"), "shared": usage("SHARED"), "local": usage("LOCAL"),
        "spill_instructions": len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        "ldg128": len(re.findall(r"LDG\.E\.128", sass)),
        "ldg": len(re.findall(r"\bLDG\.", sass)),
        "i64_row_offset": bool(re.search(r"arith\.muli .*: i64", compiled.asm["ttir"])),
    }


def compile_report():
    from .. import triton_kernels as tk
    rows = []
    for kernel in (tk._lco_forward_kernel, tk._lco_backward_kernel):
        for dtype in _TRITON_TYPE:
            for block_v, num_warps in tk.all_launch_configs(dtype):
                for arch in TARGETS:
                    for aligned in (True, False):
                        rows.append(compile_one(kernel, dtype, block_v, num_warps, arch, aligned))
    return rows


def run_report(timeout=900):
    """``compile_report()`` in a fresh interpreter without TRITON_INTERPRET (compilation needs JITFunctions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lco_kernels.diagnostics.aot"], capture_output=True, text=True,
                         env=env, timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"AOT compile report failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs real JIT functions")
    json.dump(compile_report(), sys.stdout, indent=1)
