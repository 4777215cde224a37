"""Shared pytest setup. Run the suite with `python -m pytest -q tests`.

Triton reads TRITON_INTERPRET once, when it is first imported, so the interpreter switch must be in the
environment before any test module (or nanovalor itself) imports triton. Without CUDA the interpreter is the
only way Triton kernels run at all.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
