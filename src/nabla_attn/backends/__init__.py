"""Block-sparse attention backends. Each takes tiled q, k, v and a BlockSparseMask; none knows about models."""
