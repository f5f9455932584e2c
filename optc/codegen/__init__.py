"""Triton code generation: templates → source (``generator``) → on-disk kernel cache (``cache``).

There is no Triton CPU backend: generated kernels run on CUDA tensors, or on CPU tensors
under ``TRITON_INTERPRET=1`` (which must be set before a kernel module is first imported).
"""

from optc.codegen.generator import KernelOrigin, load_kernel, render

__all__ = ["KernelOrigin", "load_kernel", "render"]
