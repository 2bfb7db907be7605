"""Count kernel launches and the bytes every tl.load / tl.store moves, under the Triton interpreter.

    with count_traffic() as launches:
        loss = lco_loss(...); loss.backward()
    launches[0].kernel, launches[0].loaded["logits_ptr"], summarize(launches, ...)

Each access is attributed to the kernel argument whose tensor holds the address, so the
vocabulary traffic (logits, gradient) is told apart from the O(N) per-row traffic. Masked-off
lanes move nothing and are not counted. Needs TRITON_INTERPRET=1 before triton is imported.
"""
import contextlib
import dataclasses
import inspect

import numpy as np


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple
    constexprs: dict  # compile-time arguments (BLOCK_V, the loss head, ...)
    loaded: dict      # argument name -> bytes loaded through pointers into that argument's tensor
    stored: dict      # argument name -> bytes stored

    def bytes_of(self, names):
        return sum(self.loaded.get(n, 0) + self.stored.get(n, 0) for n in names)


def _element_bytes(ptrs):
    return ptrs.get_element_ty().primitive_bitwidth // 8


@contextlib.contextmanager
def count_traffic():
    """Yield a list that fills with one ``Launch`` per kernel launched inside the block."""
    from triton.runtime import interpreter

    launches = []
    spans = []  # (start, end, name) of the tensor arguments of the running launch
    builder_cls = type(interpreter.interpreter_builder)
    orig_call = interpreter.GridExecutor.__call__
    orig_load = builder_cls.create_masked_load
    orig_store = builder_cls.create_masked_store

    def owner(addresses):
        names = set()
        for start, end, name in spans:
            if np.any((addresses >= start) & (addresses < end)):
                names.add(name)
        # aliasing arguments (in-place) share one span: name them together
        return "+".join(sorted(names)) if names else "?"

    def account(table, ptrs, mask):
        active = ptrs.data[mask.data] if mask is not None else ptrs.data.ravel()
        if active.size:
            key = owner(active)
            table[key] = table.get(key, 0) + int(active.size) * _element_bytes(ptrs)

    def call(self, *args, **kwargs):
        params = inspect.signature(self.fn).parameters
        kernel_kwargs = {k: v for k, v in kwargs.items() if k in params}  # drop num_warps & co.
        bound = inspect.signature(self.fn).bind(*args, **kernel_kwargs).arguments
        spans.clear()
        for name, value in bound.items():
            if hasattr(value, "data_ptr") and value.numel() > 0:
                start = value.data_ptr()
                extent = 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
                spans.append((start, start + extent * value.element_size(), name))
        grid = self.grid(bound) if callable(self.grid) else self.grid
        constexprs = {name: bound[name] for name in self.constexprs if name in bound}
        launches.append(Launch(self.fn.__name__, tuple(grid), constexprs, {}, {}))
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            spans.clear()

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        account(launches[-1].loaded, ptrs, mask)
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        account(launches[-1].stored, ptrs, mask)
        return orig_store(self, ptrs, value, mask, cache_policy)

    interpreter.GridExecutor.__call__ = call
    builder_cls.create_masked_load = load
    builder_cls.create_masked_store = store
    try:
        yield launches
    finally:
        interpreter.GridExecutor.__call__ = orig_call
        builder_cls.create_masked_load = orig_load
        builder_cls.create_masked_store = orig_store


VOCAB_ARGS = ("logits_ptr", "grad_ptr", "grad_ptr+logits_ptr")


def summarize(launches, n_rows, vocab, element_bytes, vocab_args=VOCAB_ARGS):
    """Vocabulary traffic in units of N·V elements, per-row side traffic in bytes per row, launches.

    ``vocab_args``: the kernel arguments that point into N×V tensors (ours by default; for another
    kernel, e.g. Liger's cross-entropy, its own names).
    """
    vocab_bytes = sum(l.bytes_of(vocab_args) for l in launches)
    total = sum(sum(l.loaded.values()) + sum(l.stored.values()) for l in launches)
    return {
        "launches": len(launches),
        "vocab_elements_per_NV": vocab_bytes / (element_bytes * n_rows * vocab),
        "side_bytes_per_row": (total - vocab_bytes) / n_rows,
        "unattributed_bytes": sum(l.loaded.get("?", 0) + l.stored.get("?", 0) for l in launches),
    }
