"""The Cython backend: layer kernels compiled from kernels/*.pyx (see fastrnn.cells for the contract).

Importing this package raises ImportError when the extension is not built, so that the backend
is reported missing rather than failing later.
"""
try:
    from .layers import (_limit_rowdot_isa, _set_pack_limits, _set_pool, _set_zigzag,
                         amx_available, concurrent_directions, effective_num_threads, get_amx,
                         get_num_threads, get_small_batch_max, layer_backward, layer_forward,
                         layer_call_step, quantized_path, set_amx, set_num_threads,
                         set_quantized_path, set_small_batch_max)
except ImportError as exc:
    raise ImportError(
        "the Cython extension of fastrnn is not built (fastrnn._cy.layers is missing or does not "
        f"load: {exc}). Install with a C compiler available: `pip install .` from the source tree, "
        "or for development `python setup.py build_ext --inplace`") from exc


__all__ = ["layer_forward", "layer_backward", "layer_call_step",
           "concurrent_directions",
           "set_num_threads", "get_num_threads", "effective_num_threads", "set_small_batch_max",
           "get_small_batch_max", "amx_available", "set_amx", "get_amx", "quantized_path",
           "set_quantized_path"]
