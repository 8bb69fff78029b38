"""Triton and Gluon kernels with launchers that take raw tensors and plain numbers.

- ``mask_build``: block means, block scores, the fused NABLA row kernel (table + kv lists), row
  compaction of any bool table;
- ``attention``: block-sparse flash attention forward and backward;
- ``attention_ws``: the warp-specialised Gluon forward for Hopper (128-row tables);
- ``permute``: the row permutation behind tiling and untiling (optionally writing block means).

A leaf of the package: nothing here imports the rest of ``nabla_attn`` but ``constants``, and
nothing here knows what a mask or a layout means. Importing a module compiles nothing; kernels JIT on
first launch. They run on CUDA, and on the CPU only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported), which the tests use at small sizes.
"""
