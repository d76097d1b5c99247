"""Triton INT4 kernels and their torch references, importable as ``awq_nb.kernels``.

This folder is mapped to ``awq_nb.kernels`` by pyproject.toml; it is never a top-level
``kernels`` package (that name belongs to a PyPI package that transformers probes for).
Nothing heavy is imported here, so probing this folder by accident costs nothing.
"""
