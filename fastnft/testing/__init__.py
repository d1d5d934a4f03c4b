"""Test support shipped with the package (not used by training): fake CUDA on CPU-only machines
(:mod:`fastnft.testing.fakecuda`), so that tests and ``fastnft doctor`` can check device logic without a GPU.
"""
