"""Triton kernels: the fused NABLA mask builder, the block-sparse attention kernel, the row
permutation behind ``tile``/``untile``, and (``attention_ws``) the warp-specialised Gluon forward for
Hopper.

Importing these modules compiles nothing; kernels JIT on first launch. They run on CUDA, and on the
CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` set *before* the first import), which
the tests use at small sizes.
"""

from __future__ import annotations


def _patch_interpreter_scalars() -> None:
    """Let Triton 3.6's interpreter use loaded scalars as ``range`` bounds under numpy >= 2.3.

    The interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``, which
    newer numpy rejects ("only 0-dimensional arrays can be converted"), so ``for j in range(cnt)``
    with a loaded ``cnt`` fails there (compiled Triton is unaffected). Only applied when the
    interpreter is on.
    """
    try:
        from triton import knobs
        from triton.runtime import interpreter
    except ImportError:  # no Triton: nothing to patch
        return
    if not knobs.runtime.interpret or getattr(interpreter, "_nabla_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._nabla_patched = True


_patch_interpreter_scalars()
