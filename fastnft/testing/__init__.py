"""Test support shipped with the package (not used by training), so that tests and ``fastnft doctor`` can check
what a GPU run would do without a GPU: fake CUDA on CPU-only machines (:mod:`fastnft.testing.fakecuda`) and a
host-sync counter (:mod:`fastnft.testing.syncs`) and a CPU stand-in for CUDA graphs (:mod:`fastnft.testing.graphs`).
"""
