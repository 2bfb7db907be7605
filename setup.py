import re

from setuptools import find_packages, setup

# the one place the version is written is lco_kernels/__init__.py (read here without importing torch)
VERSION = re.search(r'^__version__ = "([^"]+)"', open("lco_kernels/__init__.py", encoding="utf-8").read(), re.M)[1]

setup(
    name="lco-kernels",
    version=VERSION,
    description="Fused Triton kernels for the Logits Convex Optimization (LCO) loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lco_kernels", "lco_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0"],
    extras_require={
        # numpy: the Triton interpreter (TRITON_INTERPRET=1) runs kernels on numpy arrays;
        # hypothesis: the property-based tests (tests/test_properties.py) draw extreme and bad rows;
        # pytest-xdist: pytest.ini runs the test files on two processes (-n 2 --dist loadfile), the interpreter
        # being single-threaded Python: the suite takes about half the time on 2 cores
        "test": ["pytest", "pytest-benchmark", "numpy", "hypothesis", "pytest-xdist==3.8.0"],
        # matplotlib: the benchmark's plots; liger-kernel: its anchor, the fused cross-entropy
        # kernel that fused-loss libraries are measured against (traffic table, GPU timings)
        "bench": ["matplotlib", "liger-kernel", "pytest-benchmark"],
        # lco_kernels.integrations.trl / .verl, at the versions their tests run against. verl itself is
        # installed apart, `pip install --no-deps verl==0.9.1`: its own requirements (vLLM, wandb, a
        # transformers < 5.11, ...) are a training stack; `verl.trainer.ppo.core_algos` and
        # `verl.workers.utils.losses` need only the four listed after it here. peft: LoRA adapters through
        # TRL's peft_config (tests/test_integrations_peft.py), and verl's FSDP engine imports it.
        "integrations": ["trl==1.16.0", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0",
                         "ray==2.60.0", "tensordict==0.10.0", "omegaconf==2.4.0", "codetiming==1.4.0",
                         "peft==0.21.2"],
        # the documentation site (docs/, mkdocs.yml): MkDocs with the Material theme, the API reference
        # from the docstrings (mkdocstrings + griffe; ruff formats the signatures), math through
        # pymdownx.arithmatex (KaTeX itself is vendored under docs/assets/katex/)
        "docs": ["mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings[python]==1.0.8",
                 "mkdocstrings-python==2.0.11", "griffe==2.4.1", "pymdown-extensions==13.1.2", "ruff==0.17.6"],
    },
)
