"""Custom Triton kernels of promoe, installed as `promoe.kernels` (see setup.py).

The fused routing, permutation and grouped-GEMM kernels are the subject of their own issue; until they
land, the `torch` dispatch backend in `promoe.moe.dispatch` is the sync-free path.
"""
