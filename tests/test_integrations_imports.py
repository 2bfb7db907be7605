"""The framework integrations are optional: importing the library never imports a framework."""
import subprocess
import sys


def test_import_lco_kernels_imports_no_framework():
    code = ("import sys, lco_kernels, lco_kernels.integrations; "
            "print(sorted(m for m in ('trl', 'verl', 'transformers', 'datasets', 'accelerate', 'ray') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
