import os

import torch

if not torch.cuda.is_available():  # the kernels then run interpreted: these numbers say nothing about a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
