"""Triton kernels (@triton.jit) and their launchers: no checks, no dispatch (see embgeom._gpu)."""
