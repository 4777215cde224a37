"""Shared pytest setup. Run the suite with `python -m pytest -q tests`.

Triton reads TRITON_INTERPRET once, when it is first imported, so the interpreter switch must be in the
environment before any test module (or nanovalor itself) imports triton. Without CUDA the interpreter is the
only way Triton kernels run at all.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread: the tests run tiny tensors, where a second thread only adds synchronisation (10-20 ms per op on a
# busy 2-core machine). Benchmarks choose their own thread count.
torch.set_num_threads(1)
