"""The all-pairs engine machinery shared by every backend: settings (config), the typed state
(state), ranked lists (lists), the chunked runner with progress (runner), checkpoints and the
multi-rank split (distributed). Backends supply the tile kernels (embgeom.backends)."""
