"""fastrnn: RNN, LSTM and GRU layers for NumPy, forward and backward, with compiled CPU kernels.

    m = fastrnn.LSTM(input_size, hidden_size, num_layers=1, bidirectional=False, ...)
    y, state = m(x)                                   # inference
    y, state, cache = m.forward(x, train=True)        # training
    dx, dstate = m.backward(dy, cache)                # gradients; m.grads holds the parameters'

Conventions (shapes, names, gate orders) are PyTorch's; see README.md.
"""
import os

# The compiled kernels' OpenMP threads meet at every time step. GNU OpenMP's default is to spin
# about 300,000 times before a waiting thread sleeps: on a machine where another process holds a
# core, the waiting thread then burns the time slice of the thread it waits for (measured, LSTM
# training T=150 B=32 H=256, 2 threads: 76-85 ms alone, 2-6 s beside one busy process).
# 10,000 spins: the same speed alone, 0.4-0.6 s beside it (OMP_WAIT_POLICY=passive: 150 ms
# alone). Read once, when libgomp loads (the kernels load it after this line), and only when
# the user has chosen neither.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

from . import cells, charlm, convert, functional, sequence, train  # noqa: E402
from .dispatch import (BackendUnavailable, backends, get_backend,  # noqa: E402
                       limit_numpy_blas_threads, set_num_threads)
from .layers import GRU, LSTM, RNN  # noqa: E402
from .quantized import quantize  # noqa: E402

__version__ = "0.1.0"

__all__ = ["RNN", "LSTM", "GRU", "backends", "get_backend", "set_num_threads",
           "limit_numpy_blas_threads", "BackendUnavailable", "quantize",
           "functional", "cells", "convert", "sequence", "__version__"]
