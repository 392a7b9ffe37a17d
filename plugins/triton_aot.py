"""Ahead-of-time compilation of the Triton kernels' specialisations (what TensorRT's AOT plugins embed).

Each kernel module (``plugins/<op>/triton_kernels.py``) lists ``AOT_SPECS`` (embedded in TensorRT plugins) and
``JIT_SPECS`` (launched by the torch wrappers only); a spec is ``(kernel, signature, constexprs, options)``:
signature maps every kernel argument to a Triton type (``"*fp16"``, ``"i32"``, ``"constexpr"``), constexprs
gives the constexpr values (``None`` for an absent pointer), options the launch options (``num_warps``,
``num_stages``), which the torch wrappers use too.

triton is imported inside the functions: this module is importable without it.

Facts for the plugin author (triton 3.9, checked by tests/plugins/test_triton_aot.py):

- PTX is pinned to ISA 8.0 (CUDA 12.0): triton 3.9 otherwise writes the newest its bundled ptxas knows
  (9.4 for sm_90), which a driver older than that CUDA release refuses to JIT-compile.
- The PTX entry takes the non-constexpr arguments in signature order, then two hidden ``.u64`` pointers
  (global and profile scratch, 0 bytes for every kernel here: pass nulls).
- ``metadata.shared`` is the dynamic shared memory to launch with; the block is ``num_warps * 32`` threads.
"""

from __future__ import annotations

PTX_VERSION = 80
AOT_OPTIONS = {"ptx_version": PTX_VERSION, "enable_fp_fusion": True}


def compile_spec(spec: tuple, arch: int):
    """triton.compile one spec for ``sm_<arch>`` -> CompiledKernel (``.asm["ptx"]``, ``.asm["cubin"]``,
    ``.metadata.name``, ``.metadata.shared``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel, signature, constexprs, options = spec
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={**AOT_OPTIONS, **options})
