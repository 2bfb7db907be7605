"""The benchmark suite (``python -m bench``): lco-kernels side by side against the anchors."""
