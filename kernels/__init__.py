"""Custom Triton kernels of promoe, installed as `promoe.kernels` (see setup.py): the fused prototypical routing,
the counting-sort plan, and the permute and combine around the expert GEMMs. `backend.py` assembles them into the
`triton` dispatch backend; what each computes is defined by the `torch` backend (`promoe.moe.dispatch`).
"""
