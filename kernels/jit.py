"""`jit`: triton.jit where Triton is installed, the plain function where it is not (CPU-only
installs run the torch references, and the kernel modules must still import). `uses_triton`:
whether a launcher runs its Triton kernel for tensors like `t` (CUDA, or CPU when the kernels
were defined under TRITON_INTERPRET=1, the tests' interpreter) or its torch reference."""

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


def _probe() -> None:
    """A kernel that is never launched: `jit` of it tells whether kernels run interpreted."""


_PROBE = None if triton is None else triton.jit(_probe)


def interpreted() -> bool:
    """Whether Triton kernels were defined under TRITON_INTERPRET=1 (then they run on CPU tensors)."""
    return _PROBE is not None and type(_PROBE).__name__ == "InterpretedFunction"


def uses_triton(t) -> bool:  # noqa: ANN001 - a torch.Tensor (this module imports only triton)
    """Whether the launchers run the Triton kernels for tensors like `t` (else the references)."""
    return triton is not None and (t.is_cuda or (t.device.type == "cpu" and interpreted()))
