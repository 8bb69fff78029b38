"""Numbers every layer shares. Imports nothing, so the kernels can use them and stay a leaf."""

TILE = 8
"""Tokens per side of NABLA's spatial tile: a block is one frame x ``TILE x TILE`` tokens."""

BLOCK_TOKENS = TILE * TILE
"""Tokens per block (64): the key-block size of every table and the slot size of the tiled order."""

QUERY_BLOCKS = (64, 128)
"""Supported query-block sizes: one tile (the paper's 64x64 table) or two consecutive tiles."""
