"""The studies built on the kernels: the binding layer (trace), per-batch attention summaries,
encoder-family adapters, and the `embgeom vocab`, `embgeom text` and `embgeom project` reports."""
