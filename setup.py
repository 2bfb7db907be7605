from setuptools import find_packages, setup

setup(
    name="lco-kernels",
    version="0.1.0",
    description="Fused Triton kernels for the Logits Convex Optimization (LCO) loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lco_kernels", "lco_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0"],
    extras_require={
        # numpy: the Triton interpreter (TRITON_INTERPRET=1) runs kernels on numpy arrays
        "test": ["pytest", "pytest-benchmark", "numpy"],
        # matplotlib: the benchmark's plots; liger-kernel: its anchor, the fused cross-entropy
        # kernel that fused-loss libraries are measured against (traffic table, GPU timings)
        "bench": ["matplotlib", "liger-kernel", "pytest-benchmark"],
    },
)
