"""Custom Triton kernels of promoe, installed as `promoe.kernels` (see setup.py): the fused prototypical routing,
the counting-sort plan, the permute and combine around the expert GEMMs, the expert MLP's grouped GEMMs with its
gather, biases and GELU fused in, the standalone expert bias (+ GELU) and the RCL's token sums. A leaf: each op takes
and returns tensors and imports nothing of the model. What each computes is defined in `promoe.moe` (the `torch`
dispatch backend and `promoe.moe.routing`), whose `triton` backend (`promoe.moe.dispatch.TritonBackend`) puts these
kernels in place of the definitions.
"""
