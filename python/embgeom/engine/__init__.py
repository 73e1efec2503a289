"""The all-pairs engine machinery shared by every backend: settings (config), the typed state
(state), ranked lists (lists), the chunked runner with progress (runner) and checkpoints.
Imports nothing above it: the entry points (api, distributed) and the backends build on it."""
