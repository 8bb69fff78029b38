"""Triton's CPU interpreter, as the tests and the benchmarks' smoke runs use it.

The interpreter runs only if ``TRITON_INTERPRET=1`` is set before Triton is first imported.
:func:`patch_scalars` is applied by whoever turns it on; importing the package never patches
anything.
"""

from __future__ import annotations


def patch_scalars() -> bool:
    """Let Triton 3.6's interpreter use loaded scalars as ``range`` bounds under numpy >= 2.3.

    The interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``, which
    newer numpy rejects ("only 0-dimensional arrays can be converted"), so ``for j in range(cnt)``
    with a loaded ``cnt`` fails there (compiled Triton is unaffected). Returns whether the
    interpreter is on (nothing is patched when it is off or Triton is missing).
    """
    try:
        from triton import knobs
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not knobs.runtime.interpret:
        return False
    if getattr(interpreter, "_nabla_patched", False):
        return True
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._nabla_patched = True
    return True
