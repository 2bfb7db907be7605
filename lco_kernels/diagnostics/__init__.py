"""Tools that measure the kernels without a GPU: interpreter traffic counts and AOT compile reports."""
