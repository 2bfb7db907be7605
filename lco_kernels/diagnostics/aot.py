"""Compile the kernel configurations the API can launch ahead of time, for real GPUs, without one.

``triton.compile`` with an explicit ``GPUTarget`` gives a cubin; ``cuobjdump`` (shipped in the
triton wheel) reads its registers, stack, local-memory spills (STL/LDL instructions), shared memory
and 128-bit global loads (LDG.E.128); the TTIR shows whether row offsets are 64-bit.

What is compiled, for sm_80 and sm_90:
* the LCO forward kernel and the backward kernel, for every logits dtype and every
  (BLOCK_V, num_warps) ``launch_config`` can return, with and without the 16-divisibility of
  pointers, strides and V (e.g. V = 151936) that allows vector loads;
* every loss head (each constexpr combination the public losses launch), with and without
  stats, at the largest BLOCK_V of each dtype — the most registers the sweep can need;
* the forward kernel with its float hyperparameters typed fp64, as torch.compile may pass them.

``python -m lco_kernels.diagnostics.aot`` prints the report as JSON; ``run_report()`` runs that
in a subprocess without TRITON_INTERPRET, so it works from interpreted test sessions too.
"""
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from ..losses import Loss

_TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TARGETS = (80, 90)

# (name, LOSS, HAS_OLD, HAS_REF, DUAL_CLIP): every head variant the public losses can launch.
HEADS = (
    ("sft", Loss.SFT, False, False, False),
    ("pg", Loss.PG, False, False, False),
    ("ppo", Loss.PPO, True, False, False),
    ("ppo+dual", Loss.PPO, True, False, True),
    ("ppo+kl", Loss.PPO, True, True, False),
    ("ppo+dual+kl", Loss.PPO, True, True, True),
    ("cispo", Loss.CISPO, True, False, False),
    ("lco", Loss.LCO, False, False, False),
    ("ppo+lco", Loss.LCO, True, False, False),
)


def _signature(kernel_name, ptr_type, scalar_type="fp32"):
    """Argument types as the launcher passes them (small ints are i32, hyperparameters fp32; under
    torch.compile a Python float hyperparameter may arrive as fp64: ``scalar_type``)."""
    if kernel_name == "_policy_forward_kernel":
        sig = {"logits_ptr": ptr_type, "stride_lb": "i32", "stride_lt": "i32", "T": "i32",
               "labels_ptr": "*i64", "adv_ptr": "*fp32", "old_logp_ptr": "*fp32", "ref_logp_ptr": "*fp32",
               "loss_ptr": "*fp32", "alpha_ptr": "*fp32", "lse_excl_ptr": "*fp32", "stats_ptr": "*fp32",
               "N": "i32", "V": "i32", "ignore_index": "i32"}
        sig.update({k: scalar_type for k in ("rho_pos", "rho_neg", "eps_low", "eps_high", "clip_c", "beta")})
        sig.update({k: "constexpr" for k in ("LOSS", "HAS_OLD", "HAS_REF", "DUAL_CLIP", "WITH_STATS", "BLOCK_V")})
        return sig
    return {"logits_ptr": ptr_type, "stride_lb": "i32", "stride_lt": "i32",
            "grad_ptr": ptr_type, "stride_gb": "i32", "stride_gt": "i32", "T": "i32",
            "labels_ptr": "*i64", "coef_ptr": "*fp32", "lse_excl_ptr": "*fp32",
            "V": "i32", "BLOCK_V": "constexpr"}


def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(job):
    """Compile one configuration (a dict, see ``jobs()``) and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .. import triton_kernels as tk
    kernel = getattr(tk, job["kernel"])
    dtype = getattr(torch, job["dtype"])
    signature = _signature(job["kernel"], "*" + _TRITON_TYPE[dtype], job.get("scalars", "fp32"))
    names = list(signature)
    constexprs = {"BLOCK_V": job["BLOCK_V"]}
    if job["kernel"] == "_policy_forward_kernel":
        _, loss, has_old, has_ref, dual = next(h for h in HEADS if h[0] == job["head"])
        constexprs.update(LOSS=int(loss), HAS_OLD=has_old, HAS_REF=has_ref, DUAL_CLIP=dual, WITH_STATS=job["stats"])
    aligned_args = [n for n in names if n.endswith("_ptr") or n.startswith("stride_") or n == "V"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned_args} if job["aligned"] else {}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options={"num_warps": job["num_warps"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout

    def usage(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else None

    return dict(job, arch=f"sm_{job['arch']}", registers=usage("REG"), stack=usage("STACK"), shared=usage("SHARED"),
                local=usage("LOCAL"), spill_instructions=len(re.findall(r"\b(?:STL|LDL)\b", sass)),
                ldg128=len(re.findall(r"LDG\.E\.128", sass)), ldg=len(re.findall(r"\bLDG\.", sass)),
                i64_row_offset=bool(re.search(r"arith\.muli .*: i64", compiled.asm["ttir"])),
                fp64_arithmetic=bool(re.search(r"\b(?:add|sub|mul|div|fma)\.(?:rn\.)?f64\b", compiled.asm["ptx"])))


def jobs(quick=False):
    """All configurations; ``quick``: the base forward/backward kernels at the largest BLOCK_V only."""
    from .. import triton_kernels as tk
    if quick:
        return [dict(kernel=k, head="lco" if "forward" in k else None, stats=False, dtype=str(d).replace("torch.", ""),
                     BLOCK_V=tk.all_launch_configs()[-1][0], num_warps=tk.all_launch_configs()[-1][1], arch=arch,
                     aligned=True)
                for k in ("_policy_forward_kernel", "_policy_backward_kernel") for d in _TRITON_TYPE for arch in TARGETS]
    out = []
    for dtype in _TRITON_TYPE:
        name = str(dtype).replace("torch.", "")
        configs = tk.all_launch_configs()
        for arch in TARGETS:
            for block_v, num_warps in configs:
                for aligned in (True, False):
                    base = dict(dtype=name, BLOCK_V=block_v, num_warps=num_warps, arch=arch, aligned=aligned)
                    out.append(dict(base, kernel="_policy_forward_kernel", head="lco", stats=False))
                    out.append(dict(base, kernel="_policy_backward_kernel", head=None, stats=False))
            block_v, num_warps = configs[-1]
            for head in HEADS:
                for stats in (False, True):
                    if head[0] == "lco" and not stats:
                        continue  # compiled above
                    out.append(dict(kernel="_policy_forward_kernel", head=head[0], stats=stats, dtype=name,
                                    BLOCK_V=block_v, num_warps=num_warps, arch=arch, aligned=True))
            # hyperparameters passed as fp64 (torch.compile): still compiles, and computes in fp32
            out.append(dict(kernel="_policy_forward_kernel", head="ppo+dual+kl", stats=True, dtype=name,
                            BLOCK_V=block_v, num_warps=num_warps, arch=arch, aligned=True, scalars="fp64"))
    return out


def compile_report(quick=False, workers=None):
    workers = workers or min(4, os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, jobs(quick)))


def run_report(quick=False, timeout=1200):
    """``compile_report()`` in a fresh interpreter without TRITON_INTERPRET (compilation needs JITFunctions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "lco_kernels.diagnostics.aot"] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"AOT compile report failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs real JIT functions")
    json.dump(compile_report(quick="--quick" in sys.argv), sys.stdout, indent=1)
