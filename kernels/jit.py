"""`jit`: triton.jit where Triton is installed, the plain function where it is not (CPU-only
installs run the torch references, and the kernel modules must still import)."""

from __future__ import annotations

try:
    import triton
except ImportError:
    triton = None


def jit(fn=None, *, do_not_specialize: tuple[str, ...] = ()):  # noqa: ANN001, ANN201
    """triton.jit; integer arguments named in do_not_specialize vary call to call (row counts):
    Triton would otherwise compile a variant for each value that is 1 or a multiple of 16,
    seconds of compile in the middle of serving."""
    if fn is None:
        return lambda f: jit(f, do_not_specialize=do_not_specialize)
    if triton is None:
        return fn
    return triton.jit(fn, do_not_specialize=list(do_not_specialize))
