"""fastrnn: RNN, LSTM and GRU layers for NumPy, forward and backward, with compiled CPU kernels.

    m = fastrnn.LSTM(input_size, hidden_size, num_layers=1, bidirectional=False, ...)
    y, state = m(x)                                   # inference
    y, state, cache = m.forward(x, train=True)        # training
    dx, dstate = m.backward(dy, cache)                # gradients; m.grads holds the parameters'

Conventions (shapes, names, gate orders) are PyTorch's; see README.md.
"""
from . import cells, charlm, functional, train
from .dispatch import BackendUnavailable, backends, get_backend, set_num_threads
from .layers import GRU, LSTM, RNN

__version__ = "0.1.0"

__all__ = ["RNN", "LSTM", "GRU", "backends", "get_backend", "set_num_threads", "BackendUnavailable",
           "functional", "cells", "__version__"]
