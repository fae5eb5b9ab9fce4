"""numba kernels over the per-sample momentum state (CPU njit and numba.cuda twins)."""
