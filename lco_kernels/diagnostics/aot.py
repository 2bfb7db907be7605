"""Compile the kernel configurations the API can launch ahead of time, for real GPUs, without one.

``triton.compile`` with an explicit ``GPUTarget`` gives a cubin; ``cuobjdump`` (shipped in the
triton wheel) reads its registers, stack, local-memory spills (STL/LDL instructions), shared memory
and 128-bit global loads (LDG.E.128); the TTIR shows whether row offsets are 64-bit.

What is compiled, for sm_80 and sm_90:
* the LCO forward kernel and the backward kernel, for every logits dtype and every
  (BLOCK_V, num_warps) ``launch_config`` can return, with and without the 16-divisibility of
  pointers, strides and V (e.g. V = 151936) that allows vector loads;
* every loss head (``heads()``: each constexpr combination the public losses launch, derived from
  the loss registry), with and without stats, at the largest BLOCK_V of each dtype — the most
  registers the sweep can need; the entropy-term forward and backward; the vocabulary-parallel
  sweep-only and head-only modes;
* the forward kernel with its float hyperparameters typed fp64, as torch.compile may pass them.

``python -m lco_kernels.diagnostics.aot`` prints the report as JSON; ``run_report()`` runs that
in a subprocess without TRITON_INTERPRET, so it works from interpreted test sessions too.
"""
import concurrent.futures
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from ..registry import DIVERGENCES, KL, LOSSES

_TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TARGETS = (80, 90)


@dataclasses.dataclass(frozen=True)
class Head:
    """One constexpr combination of the forward kernel's head that the public losses can launch."""
    loss: str
    has_old: bool = False
    kl_type: KL | None = None   # None: no reference / KL term
    dual_clip: bool = False
    divergence: str | None = None   # DPPO's divergence (a key of registry.DIVERGENCES)
    bias_kl: bool = False           # the KL term weighted by the ratio (bias_correction_kl)

    @property
    def name(self):
        return "+".join([self.loss] + ["old"] * self.has_old + ["dual"] * self.dual_clip
                        + ([self.divergence] if self.divergence is not None else [])
                        + ([self.kl_type.name.lower()] if self.kl_type is not None else []) + ["bias"] * self.bias_kl)

    def arguments(self, advantages, old_logprobs, ref_logprobs):
        """(positional arguments after (logits, labels), keyword options) with which the public
        ``<loss>_loss`` launches this head (a required hyperparameter gets an arbitrary valid value)."""
        info = LOSSES[self.loss]
        args = ((advantages,) if info.advantages else ()) + ((old_logprobs,) if info.old_logprobs == "required" else ())
        options = {}
        if self.has_old and info.old_logprobs == "optional":
            options["old_logprobs"] = old_logprobs
        if self.dual_clip:
            options["dual_clip"] = 3.0
        if self.divergence is not None:
            options["divergence"] = self.divergence
        if "dro_beta" in info.hyperparameters:
            options["dro_beta"] = 0.5
        if self.kl_type is not None:
            options.update(ref_logprobs=ref_logprobs, beta=0.1, kl_type=self.kl_type.name.lower())
        if self.bias_kl:
            options["bias_correction_kl"] = True
        return args, options

    def constexprs(self):
        return dict(LOSS=int(LOSSES[self.loss].kind), HAS_OLD=self.has_old, HAS_REF=self.kl_type is not None,
                    KL_TYPE=int(self.kl_type or 0), DUAL_CLIP=self.dual_clip,
                    DIVERGENCE=DIVERGENCES[self.divergence or "tv"], BIAS_KL=self.bias_kl)


def heads():
    """Every head variant, derived from the loss registry: each loss with and without its optional
    old log-probs, dual clip where it has one, each DPPO divergence, with and without the default KL
    term where it takes advantages, and that term bias-corrected where old log-probs are given; the
    other KL estimators on one loss (the KL term is loss-independent code)."""
    out = []
    for name, info in LOSSES.items():
        olds = {"required": (True,), "optional": (False, True), "none": (False,)}[info.old_logprobs]
        duals = (False, True) if "dual_clip" in info.hyperparameters else (False,)
        divergences = tuple(DIVERGENCES) if "divergence" in info.hyperparameters else (None,)
        for old in olds:
            kls = ((None, False), (KL.K3, False)) + (((KL.K3, True),) if old else ()) if info.advantages else (
                (None, False),)
            out += [Head(name, old, kl, dual, div, bias) for dual in duals for div in divergences for kl, bias in kls]
    out += [Head("pg", kl_type=kl) for kl in KL if kl != KL.K3]
    return out


def _signature(kernel, ptr_type, scalar_type="fp32"):
    """Argument types as the launcher passes them, from the kernel's own parameter list: the logits and
    gradient pointers have the logits' type, labels are int64, other pointers fp32, the integer
    scalars (triton_backend.INT_ARGS) i32, every other scalar a float hyperparameter — fp32, or fp64
    as torch.compile may pass a Python float (``scalar_type``)."""
    from ..triton_backend import INT_ARGS
    sig = {}
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            sig[name] = "constexpr"
        elif name in ("logits_ptr", "grad_ptr"):
            sig[name] = ptr_type
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32" if name in INT_ARGS else scalar_type
    return sig


def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(job):
    """Compile one configuration (a dict, see ``jobs()``) and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .. import triton_backend as tb
    kernel = getattr(tb, job["kernel"])
    dtype = getattr(torch, job["dtype"])
    signature = _signature(kernel, "*" + _TRITON_TYPE[dtype], job.get("scalars", "fp32"))
    names = list(signature)
    constexprs = {"BLOCK_V": job["BLOCK_V"]}
    if job["kernel"] == "_forward_kernel":
        head = next(h for h in heads() if h.name == job["head"])
        constexprs.update(head.constexprs(), NEED_ENTROPY=job["stats"] or job.get("entropy", False),
                          WITH_STATS=job["stats"], MODE=job.get("mode", tb.FUSED))
    else:
        constexprs.update(HAS_ENTROPY=job.get("entropy", False))
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
    """All configurations; ``quick``: the base forward/backward kernels at the largest BLOCK_V only.

    Full: both kernels at every (BLOCK_V, num_warps), dtype, arch, aligned or not; at the largest
    BLOCK_V every head with and without stats, the entropy-gradient backward and the forward with an
    entropy term, the vocabulary-parallel sweep-only and head-only modes, and the fp64-hyperparameter
    compile."""
    from .. import triton_backend as tb
    kernels = ("_forward_kernel", "_backward_kernel")
    largest = tb.all_launch_configs()[-1]
    if quick:
        return [dict(kernel=k, head="lco" if "forward" in k else None, stats=False, dtype=str(d).replace("torch.", ""),
                     BLOCK_V=largest[0], num_warps=largest[1], arch=arch, aligned=True)
                for k in kernels for d in _TRITON_TYPE for arch in TARGETS]
    out = []
    for dtype in _TRITON_TYPE:
        name = str(dtype).replace("torch.", "")
        for arch in TARGETS:
            for block_v, num_warps in tb.all_launch_configs():
                for aligned in (True, False):
                    base = dict(dtype=name, BLOCK_V=block_v, num_warps=num_warps, arch=arch, aligned=aligned)
                    out.append(dict(base, kernel="_forward_kernel", head="lco", stats=False))
                    out.append(dict(base, kernel="_backward_kernel", head=None, stats=False))
            top = dict(dtype=name, BLOCK_V=largest[0], num_warps=largest[1], arch=arch, aligned=True)
            for head in heads():
                for stats in (False, True):
                    if head.name != "lco" or stats:  # plain lco is compiled above
                        out.append(dict(top, kernel="_forward_kernel", head=head.name, stats=stats))
            out.append(dict(top, kernel="_forward_kernel", head="ppo+old+dual+k3", stats=False, entropy=True))
            out.append(dict(top, kernel="_backward_kernel", head=None, stats=False, entropy=True))
            for mode in (tb.SWEEP, tb.HEAD):
                out.append(dict(top, kernel="_forward_kernel", head="lco", stats=True, mode=mode))
            # hyperparameters passed as fp64 (torch.compile): still compiles, and computes in fp32
            out.append(dict(top, kernel="_forward_kernel", head="ppo+old+dual+k3", stats=True, scalars="fp64"))
            out.append(dict(top, kernel="_backward_kernel", head=None, stats=False, entropy=True, scalars="fp64"))
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
