"""Triton kernels and their launchers (installed as ``vpgea.kernels``).

Layer 1 of vpgea: no autograd, no ``nn``. Each kernel file pairs private ``_name_kernel`` Triton functions with a
public launcher ``name`` that allocates outputs and picks the grid.
"""
