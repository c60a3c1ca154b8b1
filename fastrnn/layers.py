"""The layer classes: RNN, LSTM and GRU, stacked and bidirectional, on any backend.

A layer checks its inputs once, then runs one layer kernel per (layer, direction) from the
chosen backend (the contract is in ``fastrnn.cells``); it owns the parameters and their
gradients, the dropout between layers and the batch-first and padding conventions.
"""
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _scratch
from . import dispatch as _backends
from .cells import LAYER_NORM_EPS, activation_slots, cell_for
from .quantized import QuantizedWeight

__all__ = ["RNN", "LSTM", "GRU", "Cache"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_BIASES = ("b_ih", "b_hh")      # the parameters a layer with bias=False has not
# how a bidirectional layer joins its two directions' outputs (Keras's merge_mode)
MERGES = ("concat", "sum", "mul", "ave")
INITS = ("pytorch", "keras")
# Keras's activation names -> ONNX's (fastrnn.cells.ACTIVATIONS) with their parameters: Keras 3's
# hard_sigmoid is relu6(x + 3) / 6 = hardsigmoid(alpha=1/6, beta=0.5) (ONNX's default is 0.2,
# 0.5, Keras 2's); its leaky_relu has negative_slope 0.2; linear is affine(1, 0)
KERAS_ACTIVATIONS = {"tanh": ("tanh",), "sigmoid": ("sigmoid",), "relu": ("relu",),
                     "linear": ("affine", 1.0, 0.0), "hard_sigmoid": ("hardsigmoid", 1 / 6, 0.5),
                     "elu": ("elu", 1.0), "softsign": ("softsign",), "softplus": ("softplus",),
                     "leaky_relu": ("leakyrelu", 0.2)}


def _keras_activation(name, value):
    if value not in KERAS_ACTIVATIONS:
        raise ValueError(f"{name}: expected one of Keras's {', '.join(KERAS_ACTIVATIONS)} (the "
                         f"ones ONNX has too), got {value!r}")
    return KERAS_ACTIVATIONS[value]


def _cell_choice(mode, cell_options, activations, activation, recurrent_activation, clip,
                 input_forget):
    """The options of the cell record (fastrnn.cells.cell_for), checked: ONNX's activations
    (or Keras's activation / recurrent_activation), clip, input_forget."""
    options = dict(cell_options)
    keras = {k: v for k, v in (("activation", activation),
                               ("recurrent_activation", recurrent_activation)) if v is not None}
    if keras and activations is not None:
        raise ValueError(f"activations: give ONNX's activations or Keras's "
                         f"{' and '.join(keras)}, not both")
    if keras:
        if mode == "RNN" and recurrent_activation is not None:
            raise ValueError("recurrent_activation: an RNN has one activation (activation=)")
        outer = _keras_activation("activation", keras.get("activation", "tanh"))
        gates = _keras_activation("recurrent_activation",
                                  keras.get("recurrent_activation", "sigmoid"))
        activations = {"RNN": (outer,), "LSTM": (gates, outer, outer),
                       "GRU": (gates, outer)}[mode]
    if activations is not None:
        options["activations"] = activation_slots(mode, activations)
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, numbers.Real) \
                or not 0 < clip < float("inf"):
            raise ValueError(f"clip: expected None or a positive finite number (ONNX's cell "
                             f"clip threshold), got {clip!r}")
        options["clip"] = float(clip)
    if _flag("input_forget", input_forget):
        if mode != "LSTM":
            raise ValueError("input_forget: only an LSTM has input and forget gates")
        options["input_forget"] = True
    return cell_for(mode, **options)


# ---------------------------------------------------------------------------------------------
# Both directions of a bidirectional layer at once: direction 0 on the calling thread,
# direction 1 on a helper thread, each kernel call limited to one thread (threads=1), when the
# backend says such calls make no BLAS call (concurrent_directions). The two directions share
# nothing but their input, so there is no barrier between them; with the threads splitting each
# step instead, a small step is mostly waiting (bilstm-train, T=100 B=16 H=128: 37-41 -> 31 ms).

_CONCURRENT_MIN_WORK = 1 << 21   # multiply-adds of one direction's call: ~20 us on one core
_helper = [None, None]           # (executor, pid): a forked child makes its own
_helper_lock = threading.Lock()
# A thread that held the lock at a fork does not exist in the child: give the child a free one.
os.register_at_fork(after_in_child=lambda: globals().__setitem__("_helper_lock", threading.Lock()))


def _helper_thread():
    with _helper_lock:
        if _helper[1] != os.getpid():
            _helper[0] = ThreadPoolExecutor(1, thread_name_prefix="fastrnn-direction")
            _helper[1] = os.getpid()
        return _helper[0]


def _at_once(kernels, T, B, train, work):
    """Whether to run the two directions of a layer at once (see above)."""
    concurrent = getattr(kernels, "concurrent_directions", None)
    return work >= _CONCURRENT_MIN_WORK and concurrent is not None and concurrent(T, B, train)


def _both_directions(run):
    """run(0, threads=1) here and run(1, threads=1) on the helper thread; their results."""
    other = _helper_thread().submit(run, 1, 1)
    try:
        first = run(0, 1)
    finally:
        second = other.result()       # waited for even when direction 0 failed
    return first, second


# ---------------------------------------------------------------------------------------------
# Validation: every error names the argument, what was expected and what came.

def _aligned_zeros(shape, dtype):
    """Zeros whose data starts on a cache line (64 bytes, one AVX-512 vector). NumPy aligns to
    16 bytes only; weights read with a vector load that spans two lines cost the small-batch
    products up to a fifth of their time (cython, A/B of one layer's weights 64- or 32-byte
    aligned: GRU step H=128 7.6 -> 5.9 us, lstm-infer-512-b1 1.32 -> 1.10 ms)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + _scratch.ALIGN, np.uint8)
    start = -raw.ctypes.data % _scratch.ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _kept_copy(arr):
    """A copy of ``arr`` (None stays None) for a training cache: backward then reads what
    forward read, whatever the caller does with its arrays in between. Big ones come from the
    workspace pool (no page faults per call). Backward does not gain from 64-byte aligned
    weights as the forward's small-batch products do (LSTM B=1..32: the same time)."""
    if arr is None or arr.nbytes < _scratch.MIN_BYTES:
        return None if arr is None else arr.copy()
    out = _scratch.empty(arr.shape, arr.dtype)
    np.copyto(out, arr)
    return out


def _positive_int(name, value):
    """``value`` as a Python int >= 1; NumPy integers are ints, bools are not."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    return int(value)


def _flag(name, value):
    """``value`` as a bool: True, False, NumPy bools, and 0 or 1. Anything else (``"no"``,
    None, 0.5) is refused rather than read by its truth value."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral)
                                               and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


def _truncation(truncate, T):
    """``truncate`` of backward for T steps: None or an int k >= 1; None also when k >= T,
    where nothing is cut (so any int, beyond int64 too, reaches the kernels as a small one)."""
    if truncate is None:
        return None
    truncate = _positive_int("truncate", truncate)
    return truncate if truncate < T else None


def _seed_sequence(seed):
    """``np.random.SeedSequence(seed)``, with an error that names ``seed``."""
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed: expected None or an int >= 0, got bool {seed!r}")
    try:
        return np.random.SeedSequence(seed)
    except (TypeError, ValueError):
        raise (ValueError if isinstance(seed, numbers.Integral) else TypeError)(
            f"seed: expected None or an int >= 0 (or a sequence of them), got "
            f"{type(seed).__name__} {seed!r}") from None


def _float_array(name, value, dtype, shape):
    """``value`` as a C-contiguous array of ``dtype`` with ``shape`` (None entries: any size).

    Other floating dtypes are cast; integer, bool, complex and object arrays are refused. The
    result may be the caller's own array: never write it.
    """
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, arr.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _lengths(value, T, B):
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu" or arr.dtype == bool:
        raise TypeError(f"lengths: expected integers, got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},) (one length per batch row), "
                         f"got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > T):
        raise ValueError(f"lengths: expected values in [0, {T}] (T = {T}), "
                         f"got min {arr.min()} and max {arr.max()}")
    return np.array(arr, dtype=np.int64)   # a copy: a training cache keeps it until backward


def _checked_zoneout(mode, zoneout):
    """``zoneout`` checked: LSTM (z_c, z_h) (one number: both), else z; each in [0, 1)."""
    def rate(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f"zoneout: expected {expected}, each in [0, 1), got {zoneout!r}")
        return float(value)
    if mode == "LSTM":
        expected = "a number or a pair (z_c, z_h) for LSTM"
        if isinstance(zoneout, (tuple, list)):
            if len(zoneout) != 2:
                raise ValueError(f"zoneout: expected {expected}, each in [0, 1), got "
                                 f"{zoneout!r}")
            return rate(zoneout[0]), rate(zoneout[1])
        return rate(zoneout), rate(zoneout)
    expected = f"a number for {mode}"
    return rate(zoneout)


class Cache:
    """What ``forward(train=True)`` keeps for ``backward``: one entry per layer and direction.

    Nothing in it is the caller's: the input and the parameters are copies (if the caller
    changes x or ``params`` before backward, backward still differentiates the forward that
    ran), so is ``lengths``."""

    def __init__(self, made_by, T, B, lengths, batch_first):
        self.made_by = made_by          # the layer's _identity: backward checks it is its own
        self.T, self.B = T, B
        self.lengths = lengths          # (B,) int64
        self.batch_first = batch_first
        self.inputs = []                # per layer: its input (T, B, I_k), after dropout
        self.masks = []                 # per layer k >= 1: dropout mask applied to its input
        self.recurrent_masks = []       # per layer and direction: (G, B, H) recurrent dropout
                                        # masks, or None
        self.zoneout_masks = []         # per layer and direction: zoneout's keep masks, one
                                        # (T, B, width) array per state (0.0: that state's
                                        # rate is 0), or None
        self.outputs = []               # per layer, merge other than concat: both directions'
                                        # outputs (T, B, 2H) before the merge
        self.kernel_caches = []         # per layer and direction: the backend's own cache, which
                                        # holds the layer input, state and parameter copies


class _RNNBase:
    mode = None  # "RNN", "LSTM" or "GRU"
    quantized = None    # "bfloat16" or "int8": an inference-only copy (fastrnn.quantize)

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, merge="concat", init="pytorch",
                 recurrent_dropout=0.0, activations=None, clip=None, activation=None,
                 recurrent_activation=None, layer_norm=False, layer_norm_eps=LAYER_NORM_EPS,
                 zoneout=0.0, dtype=np.float32, backend="auto", seed=None, proj_size=0,
                 _cell_options=None, _input_forget=False):
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        if self.mode != "LSTM" and proj_size != 0:
            raise ValueError(f"proj_size: only an LSTM has a projection (PyTorch's proj_size), "
                             f"not {self.mode}")
        if isinstance(proj_size, bool) or not isinstance(proj_size, numbers.Integral) \
                or not 0 <= proj_size < self.hidden_size:
            raise ValueError(f"proj_size: expected an int in [0, hidden_size) = "
                             f"[0, {self.hidden_size}) (0: no projection), got {proj_size!r}")
        self.proj_size = int(proj_size)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) \
                or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from None
        if self.dtype not in _DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {self.dtype}")
        self.bias = _flag("bias", bias)
        self.batch_first = _flag("batch_first", batch_first)
        self.dropout = float(dropout)
        if isinstance(recurrent_dropout, bool) or not isinstance(recurrent_dropout, numbers.Real) \
                or not 0 <= recurrent_dropout < 1:
            raise ValueError(f"recurrent_dropout: expected a number in [0, 1), got "
                             f"{recurrent_dropout!r}")
        self.recurrent_dropout = float(recurrent_dropout)
        if self.recurrent_dropout and self.proj_size:
            raise ValueError("recurrent_dropout: not available with proj_size (neither PyTorch "
                             "nor Keras has the two together)")
        self.zoneout = _checked_zoneout(self.mode, zoneout)
        self.bidirectional = _flag("bidirectional", bidirectional)
        self.num_directions = 2 if self.bidirectional else 1
        if merge not in MERGES:
            raise ValueError(f"merge: expected one of {', '.join(map(repr, MERGES))}, "
                             f"got {merge!r}")
        if merge != "concat" and not self.bidirectional:
            raise ValueError(f"merge: {merge!r} needs bidirectional=True (one direction has "
                             f"nothing to merge)")
        self.merge = merge
        if init not in INITS:
            raise ValueError(f"init: expected one of {', '.join(map(repr, INITS))}, got {init!r}")
        self.init = init
        self.layer_norm = _flag("layer_norm", layer_norm)
        cell_options = dict(_cell_options or {}, projected=self.proj_size > 0)
        if self.layer_norm:
            cell_options["layer_norm_eps"] = layer_norm_eps
        self.cell = _cell_choice(self.mode, cell_options, activations, activation,
                                 recurrent_activation, clip, _input_forget)
        self.backend = _backends.resolve(backend)
        self._kernels = _backends.get_backend(self.backend)
        seed_seq = _seed_sequence(seed)
        init_seed, dropout_seed = seed_seq.spawn(2)
        # the dropout masks come from this generator; set it to replay the same masks
        self.rng = np.random.default_rng(dropout_seed)
        self.params = self._init_params(np.random.default_rng(init_seed))
        self.grads = {name: _aligned_zeros(p.shape, p.dtype) for name, p in self.params.items()}
        # per (layer, direction): the keys of the cell's parameters (cell.param_names order;
        # None: a bias of a layer without biases), and zero biases for bias=False (the kernels
        # always take biases)
        self._param_keys = {}
        self._param_shape = self._param_shapes()                 # name -> shape
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                self._param_keys[layer, direction] = tuple(
                    None if p.name in _BIASES and not self.bias else p.key + suffix
                    for p in self.cell.params)
        self._zero_bias = np.zeros(self.cell.num_gates * self.hidden_size, self.dtype)
        self._zero_bias.flags.writeable = False
        self._identity = self._describe()
        # a backend's whole one-step call (layer_call_step) and what it takes of the layer
        self._call_step = self._backend_call_step()
        # names per layer and direction: (w_ih, w_hh, b_ih, b_hh, peephole), None: absent
        self._step_spec = (self.cell.code, self.dtype == np.float64, self.input_size,
                           self.hidden_size, self.num_layers, self.num_directions,
                           tuple(self._param_keys[row] + (None,) * (5 - len(self._param_keys[row]))
                                 for row in sorted(self._param_keys)),
                           self._zero_bias)

    # copy.deepcopy and pickle: the backend (a module) is not copied but looked up again
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_kernels"], state["_call_step"]
        return state

    def __setstate__(self, state):
        state.setdefault("proj_size", 0)         # pickled before proj_size existed
        state.setdefault("layer_norm", False)    # and before layer_norm
        state.setdefault("zoneout", (0.0, 0.0) if self.mode == "LSTM" else 0.0)    # zoneout
        self.__dict__.update(state)
        for store in (self.params, self.grads):     # copies come 16-byte aligned
            for name, p in store.items():
                if isinstance(p, np.ndarray) and p.ctypes.data % _scratch.ALIGN:
                    store[name] = _aligned_zeros(p.shape, p.dtype)
                    store[name][...] = p
        self._kernels = _backends.get_backend(self.backend)
        self._call_step = self._backend_call_step()
        self._identity = self._describe()

    @property
    def _zoneout_rates(self):
        """The zoneout rate of each state, in ``cell.state_names`` order: (z_h,) or, LSTM,
        (z_h, z_c) (``zoneout`` is LSTM's (z_c, z_h))."""
        return (self.zoneout[1], self.zoneout[0]) if self.mode == "LSTM" else (self.zoneout,)

    @property
    def _merged(self):
        """Whether the two directions' outputs are merged (sum, mul, ave), not concatenated;
        only bidirectional layers have a merge other than concat (checked in __init__)."""
        return self.merge != "concat"

    @property
    def _h_size(self):
        """Width of h, of each direction's output and of the recurrent weights' rows: H, or
        proj_size for a projected LSTM."""
        return self.proj_size or self.hidden_size

    @property
    def output_size(self):
        """Width of y and of each layer's output: D*H (H: proj_size when projected), or H when
        two directions are merged by sum, mul or ave."""
        return self._h_size * (1 if self._merged else self.num_directions)

    def _state_shapes(self, B):
        """Shapes of the state's parts, (h[, c]): h (L*D, B, P), c (L*D, B, H)."""
        rows = self.num_layers * self.num_directions
        shapes = ((rows, B, self._h_size), (rows, B, self.hidden_size))
        return shapes[:len(self.cell.state_names)]

    @staticmethod
    def _describe_shapes(shapes):
        """How the state's parts are named in errors: one shape, or h's and c's when they
        differ (a projected LSTM)."""
        if len(shapes) == 1 or shapes[0] == shapes[1]:
            return f"arrays of shape {shapes[0]}"
        return f"arrays of shapes {shapes[0]} and {shapes[1]}"

    def _backend_call_step(self):
        """The backend's one-step call, which knows only concatenated directions of cells
        without a projection."""
        if self._merged or self.proj_size or self.cell.whole_rows or any(self._zoneout_rates):
            return None
        return getattr(self._kernels, "layer_call_step", None)

    def _describe(self):
        """What a cache records of the layer that made it, for backward to compare."""
        return {"cell": self.cell.name, "input_size": self.input_size,
                "hidden_size": self.hidden_size, "proj_size": self.proj_size,
                "num_layers": self.num_layers,
                "num_directions": self.num_directions, "merge": self.merge, "bias": self.bias,
                "recurrent_dropout": self.recurrent_dropout,
                "zoneout": self.zoneout if any(self._zoneout_rates) else 0.0,   # none alike
                "options": None if self.cell.plain else (   # ONNX's: a cell with options
                    self.cell.activations, self.cell.clip, self.cell.input_forget),
                "layer_norm_eps": self.cell.layer_norm_eps,
                "dtype": self.dtype.name, "backend": self.backend, "quantized": self.quantized}

    # -- parameters ------------------------------------------------------------------------
    def _param_shapes(self):
        """Parameter names and shapes in PyTorch's order (the cell record's, layer by layer)."""
        H = self.hidden_size
        shapes = {}
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else self.output_size
            cell_shapes = self.cell.param_shapes(layer_input, H, self.proj_size)
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                for p in self.cell.params:
                    if self.bias or p.name not in _BIASES:
                        shapes[p.key + suffix] = cell_shapes[p.name]
        return shapes

    def _init_params(self, rng):
        """init="pytorch": every parameter uniform in +-1/sqrt(H). init="keras": Keras's
        defaults, Glorot-uniform input weights, orthogonal recurrent weights, zero biases but
        the LSTM forget gate's b_ih (1, unit_forget_bias), zero peepholes; a projection
        (Keras has none) Glorot-uniform like the input weights."""
        bound = 1.0 / np.sqrt(self.hidden_size)
        params = {}
        for name, shape in self._param_shapes().items():
            params[name] = _aligned_zeros(shape, self.dtype)
            if name.startswith("ln_"):
                # layer norm: gains 1, shifts 0 (either init)
                if "_weight_" in name:
                    params[name][...] = 1.0
            elif self.init == "pytorch":
                params[name][...] = rng.uniform(-bound, bound, size=shape)
            elif name.startswith(("weight_ih", "weight_hr")):
                # Keras's kernel is this transposed, (I, G*H): fans I and G*H either way
                limit = np.sqrt(6.0 / (shape[0] + shape[1]))
                params[name][...] = rng.uniform(-limit, limit, size=shape)
            elif name.startswith("weight_hh"):
                params[name][...] = _orthogonal_columns(rng, shape)
            elif name.startswith("bias_ih") and self.mode == "LSTM":
                H = self.hidden_size
                params[name][H:2 * H] = 1.0      # gate order i, f, g, o
        return params

    def _check_params(self):
        """Raise naming a parameter that is missing from ``params`` or is not an array of the
        layer's dtype and shape (it is a dict anyone may change between calls; each backend
        would say it otherwise, and the reference by a NumPy broadcasting error)."""
        params, dtype = self.params, self.dtype
        for name, shape in self._param_shape.items():
            value = params.get(name)
            if isinstance(value, np.ndarray) and value.dtype == dtype and value.shape == shape:
                continue
            if self.quantized and isinstance(value, QuantizedWeight) and value.shape == shape:
                continue
            where = f"params[{name!r}]"
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{where}: expected a {dtype.name} array of shape {shape}, got "
                                f"{type(value).__name__}")
            if value.dtype != dtype:
                raise TypeError(f"{where}: expected a {dtype.name} array, got "
                                f"{value.dtype.name}")
            raise ValueError(f"{where}: expected shape {shape}, got {value.shape}")

    def _layer_params(self, store, layer, direction):
        """One layer and direction's parameters from ``store``, in ``cell.param_names`` order;
        for bias=False, zero biases (from a gradient store: arrays the kernels may write)."""
        return tuple(store[key] if key is not None
                     else self._zero_bias if store is self.params
                     else np.zeros_like(self._zero_bias)
                     for key in self._param_keys[layer, direction])

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def state_dict(self):
        """A copy of the parameters, by PyTorch's names."""
        return {name: p.copy() for name, p in self.params.items()}

    def load_state_dict(self, state_dict):
        """Copy parameters in from any mapping of array-likes (e.g. a PyTorch state_dict with
        each tensor converted by ``.numpy()``). Every key must be present and of the right
        shape; unknown keys are refused. The layer's arrays are updated in place."""
        if self.quantized:
            raise ValueError(f"load_state_dict: this layer is quantized ({self.quantized}); "
                             f"load the float32 layer and quantize it again")
        expected = self._param_shapes()
        missing = [k for k in expected if k not in state_dict]
        unknown = [k for k in state_dict if k not in expected]
        if missing:
            raise KeyError(f"state_dict: missing key(s) {missing}")
        if unknown:
            raise KeyError(f"state_dict: unexpected key(s) {unknown}; "
                           f"expected {list(expected)}")
        values = {name: _float_array(f"state_dict[{name!r}]", state_dict[name], self.dtype,
                                     shape) for name, shape in expected.items()}
        for name, value in values.items():
            self.params[name][...] = value

    # -- forward and backward ------------------------------------------------------------
    def _check_state(self, state, B):
        """The initial state as a tuple of (L*D, B, H) arrays (h: P wide when projected),
        zeros where None."""
        shapes = self._state_shapes(B)
        names = ("h0", "c0") if self.cell.has_cell_state else ("h0",)
        if state is None:
            return tuple(np.zeros(shape, self.dtype) for shape in shapes)
        if self.cell.has_cell_state:
            expected = self._describe_shapes(shapes)
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"state: expected a tuple (h0, c0) of {expected}, "
                                f"got {type(state).__name__}")
            for name, part in zip(names, state):
                if part is None:
                    raise TypeError(f"state: expected a tuple (h0, c0) of {expected}, got "
                                    f"{name} None (state=None starts both from zeros)")
            parts = state
        else:
            if isinstance(state, (tuple, list)):
                raise TypeError(f"state: expected an array of shape {shapes[0]}, "
                                f"got {type(state).__name__}")
            parts = (state,)
        return tuple(_float_array(f"state {name}", part, self.dtype, shape)
                     for name, part, shape in zip(names, parts, shapes))

    def _check_input(self, x):
        x_arr = np.asarray(x)
        if x_arr.dtype.kind != "f":
            raise TypeError(f"x: expected a floating-point array, got dtype {x_arr.dtype}")
        if x_arr.ndim != 3:
            layout = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
            raise ValueError(f"x: expected 3 dimensions {layout}, got shape {x_arr.shape}")
        if x_arr.shape[2] != self.input_size:
            raise ValueError(f"x: expected input_size {self.input_size} in the last dimension, "
                             f"got shape {x_arr.shape}")
        if 0 in x_arr.shape[:2]:
            raise ValueError(f"x: expected at least one time step and one batch row, "
                             f"got shape {x_arr.shape}")
        if self.batch_first:
            x_arr = x_arr.transpose(1, 0, 2)
        return x_arr  # (T, B, I), any dtype and layout

    def __call__(self, x, state=None, lengths=None):
        """Inference: ``y, state``; keeps nothing for backward and applies no dropout.

        A call on ONE time step whose arrays are already what the kernels take (the layer's
        dtype, C-contiguous) goes through the backend's ``layer_call_step``, the whole call in
        compiled code, when the backend has one: nothing is checked twice or copied. Anything
        else takes the general path, which validates and converts."""
        if lengths is None and self._call_step is not None:
            result = self._call_step(self._step_spec, self.params, self.batch_first, x, state)
            if result is not None:
                return result
        y, state, _ = self.forward(x, state, lengths, train=False)
        return y, state

    def forward(self, x, state=None, lengths=None, train=True):
        """``y, state, cache``; ``cache`` is None when ``train`` is False.

        x: (T, B, input_size), or (B, T, input_size) with batch_first; state: see ``_check_state``;
        lengths: (B,) integers in [0, T], None for all T steps.
        """
        x_tbi = self._check_input(x)
        self._check_params()
        T, B, _ = x_tbi.shape
        L, D, H = self.num_layers, self.num_directions, self._h_size
        initial = self._check_state(state, B)
        if lengths is None:
            lengths_arr = np.full(B, T, dtype=np.int64)
        else:
            lengths_arr = _lengths(lengths, T, B)
        train = _flag("train", train)
        if train and self.quantized:
            raise ValueError(f"train: a quantized layer ({self.quantized}) is for inference "
                             f"only; train the float32 layer and quantize it again")
        layer_input = np.ascontiguousarray(x_tbi, dtype=self.dtype)
        padded = (lengths_arr < T).any()
        if (train or padded) and np.may_share_memory(layer_input, x_tbi):
            # the caller's own x: neither kept for backward nor zeroed in place
            layer_input = _kept_copy(layer_input)
        if padded:
            # zero the padding so that nothing there (NaN included) reaches the weight GEMMs
            layer_input[np.arange(T)[:, None] >= lengths_arr[None, :]] = 0
        final = tuple(np.empty_like(s) for s in initial)
        # per row (layer * D + direction), in cell.param_names order; copies for a training
        # call, whose kernel caches keep them for backward
        weights = [self._layer_params(self.params, layer, direction)
                   for layer in range(L) for direction in range(D)]
        cache = None
        if train:
            cache = Cache(self._identity, T, B, lengths_arr, self.batch_first)
            weights = [tuple(_kept_copy(w) for w in row) for row in weights]
        for layer in range(L):
            if layer > 0 and train and self.dropout > 0:
                keep = self.rng.random(layer_input.shape) >= self.dropout
                mask = (keep / (1 - self.dropout)).astype(self.dtype)  # (T, B, D*H)
                layer_input = layer_input * mask
                cache.masks.append(mask)
            elif layer > 0 and train:
                cache.masks.append(None)
            if layer == L - 1 and self.batch_first and not self._merged:
                out_btd = _scratch.empty((B, T, D * H), self.dtype)  # the caller's layout
                out = out_btd.transpose(1, 0, 2)                 # (T, B, D*H) view of it
            else:
                out = _scratch.empty((T, B, D * H), self.dtype)
            if train:
                cache.inputs.append(layer_input)
            # recurrent dropout: per direction one mask per gate block, for all steps
            recurrent_masks = [self._recurrent_mask(B) if train else None for _ in range(D)]
            if train:
                cache.recurrent_masks.extend(recurrent_masks)
            zoneouts = [self._zoneout_keeps(T, B, train) for _ in range(D)]
            if train:
                cache.zoneout_masks.extend(zoneouts)

            def run(direction, threads=None, layer=layer, layer_input=layer_input, out=out):
                row = layer * D + direction
                return self._kernels.layer_forward(
                    self.cell, layer_input, tuple(s[row] for s in initial), weights[row],
                    lengths_arr, bool(direction), train,
                    out[:, :, direction * H:(direction + 1) * H],
                    tuple(s[row] for s in final), threads=threads,
                    recurrent_mask=recurrent_masks[direction], zoneout=zoneouts[direction])
            work = T * B * self.cell.num_gates * self.hidden_size * (layer_input.shape[2] + H)
            if D == 2 and _at_once(self._kernels, T, B, train, work):
                kernel_caches = _both_directions(run)
            else:
                kernel_caches = [run(direction) for direction in range(D)]
            if train:
                cache.kernel_caches.extend(kernel_caches)
            if self._merged:
                if train:
                    cache.outputs.append(out)        # mul's backward reads both directions
                out = _merge_directions(self.merge, out, H,
                                        layer == L - 1 and self.batch_first)
                out_btd = out.transpose(1, 0, 2)
            layer_input = out
        y = out_btd if self.batch_first else out
        return y, self._state_out(final), cache

    def _recurrent_mask(self, B):
        """Recurrent dropout masks of one layer and direction, (G, B, H), 0 or 1/(1-p) (Keras's:
        one per gate block), from self.rng; None without recurrent dropout."""
        p = self.recurrent_dropout
        if p == 0:
            return None
        keep = self.rng.random((self.cell.num_gates, B, self.hidden_size)) >= p
        return (keep / (1 - p)).astype(self.dtype)

    def _zoneout_keeps(self, T, B, train):
        """Zoneout of one layer and direction, the kernels' ``zoneout`` argument (one entry per
        state): with train, keep masks (T, B, width) from self.rng, 1 where a unit keeps its
        value before the step (probability z), 0 where it takes the new one; else the rates
        (the expectation). None without zoneout."""
        rates = self._zoneout_rates
        if not any(rates):
            return None
        if not train:
            return rates
        widths = (self._h_size, self.hidden_size)
        return tuple((self.rng.random((T, B, width)) < z).astype(self.dtype) if z else 0.0
                     for z, width in zip(rates, widths))

    def backward(self, dy, cache, dstate=None, truncate=None, grads_ready=None):
        """``dx, dstate0``: gradients of the input and the initial state; ADDS the parameter
        gradients into ``self.grads``.

        dy: gradient of y (same shape as y) or None; dstate: gradient of the final state (same
        structure as the state) or None; truncate: None or k >= 1 (see DESIGN.md);
        grads_ready: None or a function called with k as soon as layer k's gradients (both
        directions) are final, top layer first, so that a distributed driver can reduce them
        while the layers below run (``fastrnn.distributed``).
        """
        if grads_ready is not None and not callable(grads_ready):
            raise TypeError(f"grads_ready: expected a function of the layer index or None, "
                            f"got {type(grads_ready).__name__}")
        if not isinstance(cache, Cache):
            raise TypeError("cache: expected the cache returned by forward(..., train=True) "
                            f"of this layer, got {type(cache).__name__}")
        if cache.made_by != self._identity:
            made, mine = cache.made_by, self._identity
            differ = [key for key in mine if made.get(key) != mine[key]]
            raise ValueError(
                "cache: made by forward of another layer, with "
                + ", ".join(f"{key}={made.get(key)!r}" for key in differ) + "; this layer has "
                + ", ".join(f"{key}={mine[key]!r}" for key in differ))
        T, B = cache.T, cache.B
        truncate = _truncation(truncate, T)
        self._check_params()    # backward reads the cache's copies, but a broken layer is named
        L, D, H = self.num_layers, self.num_directions, self._h_size
        if dy is not None:
            width = self.output_size
            y_shape = (B, T, width) if cache.batch_first else (T, B, width)
            dy = _check_gradient("dy", dy, self.dtype, y_shape)
            if cache.batch_first:
                dy = dy.transpose(1, 0, 2)
        d_final = self._check_dstate(dstate, B)
        d_initial = tuple(np.zeros(shape, self.dtype) for shape in self._state_shapes(B))
        scratch_bias = {}
        for layer in reversed(range(L)):
            if self._merged and dy is not None:     # the gradient of each direction's output
                dy = _unmerge_gradient(self.merge, dy, cache.outputs[layer], H)
            layer_input = cache.inputs[layer]
            d_input = _scratch.zeros(layer_input.shape, self.dtype)
            work = T * B * self.cell.num_gates * self.hidden_size * (layer_input.shape[2] + H)
            at_once = D == 2 and _at_once(self._kernels, T, B, True, work)
            # directions at once add into d_input each on its own, then the sum
            d_inputs = [d_input, _scratch.zeros(layer_input.shape, self.dtype)] if at_once \
                else [d_input] * D
            for direction in range(D):
                if not self.bias:  # the kernel adds bias gradients somewhere: a scratch buffer
                    grads = self._layer_params(self.grads, layer, direction)
                    scratch_bias.setdefault((layer, direction), (np.zeros_like(grads[2]),
                                                                 np.zeros_like(grads[3])))

            def run(direction, threads=None, layer=layer, dy=dy):
                row = layer * D + direction
                grads = list(self._layer_params(self.grads, layer, direction))
                if not self.bias:
                    grads[2], grads[3] = scratch_bias[layer, direction]
                self._kernels.layer_backward(
                    self.cell, cache.kernel_caches[row],
                    None if dy is None else dy[:, :, direction * H:(direction + 1) * H],
                    tuple(None if d is None else d[row] for d in d_final), truncate,
                    d_inputs[direction], tuple(d[row] for d in d_initial), tuple(grads),
                    threads=threads)
            if at_once:
                _both_directions(run)
                d_input += d_inputs[1]
            else:
                for direction in range(D):
                    run(direction)
            if grads_ready is not None:
                grads_ready(layer)
            if layer > 0:
                mask = cache.masks[layer - 1]
                dy = d_input if mask is None else d_input * mask
        dx = d_input.transpose(1, 0, 2) if cache.batch_first else d_input
        return dx, self._state_out(d_initial)

    def _check_dstate(self, dstate, B):
        """Gradient of the final state as a tuple (dh_n[, dc_n]); entries may be None."""
        shapes = self._state_shapes(B)
        shape = shapes[0]
        if self.cell.has_cell_state:
            if dstate is None:
                return (None, None)
            if not isinstance(dstate, (tuple, list)) or len(dstate) != 2:
                raise TypeError(f"dstate: expected a tuple (dh_n, dc_n) of "
                                f"{self._describe_shapes(shapes)} "
                                f"(either may be None), got {type(dstate).__name__}")
            return tuple(None if part is None else _float_array(f"dstate {name}", part,
                                                                self.dtype, part_shape)
                         for name, part, part_shape in zip(("dh_n", "dc_n"), dstate, shapes))
        if dstate is None:
            return (None,)
        if isinstance(dstate, (tuple, list)):
            raise TypeError(f"dstate: expected an array of shape {shape}, "
                            f"got {type(dstate).__name__}")
        return (_float_array("dstate", dstate, self.dtype, shape),)

    def _state_out(self, parts):
        return tuple(parts) if self.cell.has_cell_state else parts[0]

    def __repr__(self):
        options = [f"{self.input_size}, {self.hidden_size}"]
        if self.num_layers != 1:
            options.append(f"num_layers={self.num_layers}")
        if self.proj_size:
            options.append(f"proj_size={self.proj_size}")
        if self.bidirectional:
            options.append("bidirectional=True")
        if self.batch_first:
            options.append("batch_first=True")
        if self._merged:
            options.append(f"merge={self.merge!r}")
        if self.dropout:
            options.append(f"dropout={self.dropout}")
        if self.recurrent_dropout:
            options.append(f"recurrent_dropout={self.recurrent_dropout}")
        if any(self._zoneout_rates):
            options.append(f"zoneout={self.zoneout}")
        if self.layer_norm:
            options.append("layer_norm=True")
            if self.cell.layer_norm_eps != LAYER_NORM_EPS:
                options.append(f"layer_norm_eps={self.cell.layer_norm_eps}")
        if self.init != "pytorch":
            options.append(f"init={self.init!r}")
        if not self.cell.plain:
            options.append(f"activations={self.cell.activations!r}")
            if self.cell.clip is not None:
                options.append(f"clip={self.cell.clip}")
            if self.cell.input_forget:
                options.append("input_forget=True")
        options.append(f"cell={self.cell.name!r}, dtype={self.dtype.name}, "
                       f"backend={self.backend!r}")
        if self.quantized:
            options.append(f"quantized={self.quantized!r}")
        return f"{type(self).__name__}({', '.join(options)})"


def _orthogonal_columns(rng, shape):
    """A (rows, cols) matrix with orthonormal columns (rows >= cols), Haar-distributed: Keras's
    Orthogonal initializer of the recurrent kernel (cols, rows) has orthonormal rows."""
    q, r = np.linalg.qr(rng.standard_normal(shape))
    return q * np.sign(np.diag(r))          # signs fixed so the distribution is uniform


def _merge_directions(merge, out, H, batch_first):
    """The merge of out (T, B, 2H), forward half and reverse half, into (T, B, H) (a view of
    a (B, T, H) array when ``batch_first``)."""
    T, B = out.shape[:2]
    if batch_first:
        merged = _scratch.empty((B, T, H), out.dtype).transpose(1, 0, 2)
    else:
        merged = _scratch.empty((T, B, H), out.dtype)
    forward, reverse = out[:, :, :H], out[:, :, H:]
    if merge == "sum":
        np.add(forward, reverse, out=merged)
    elif merge == "mul":
        np.multiply(forward, reverse, out=merged)
    else:                                   # ave
        np.add(forward, reverse, out=merged)
        merged *= 0.5
    return merged


def _unmerge_gradient(merge, d_merged, out, H):
    """The gradient of out (T, B, 2H) from the gradient of its merge (T, B, H)."""
    d_out = _scratch.empty(out.shape, out.dtype)
    if merge == "mul":                      # d(f * r) = r df + f dr
        np.multiply(d_merged, out[:, :, H:], out=d_out[:, :, :H])
        np.multiply(d_merged, out[:, :, :H], out=d_out[:, :, H:])
    else:
        scale = 0.5 if merge == "ave" else 1.0
        np.multiply(d_merged, scale, out=d_out[:, :, :H])
        d_out[:, :, H:] = d_out[:, :, :H]
    return d_out


def _check_gradient(name, value, dtype, shape):
    """A gradient array: like ``_float_array`` but strided arrays are kept as they are."""
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    if arr.dtype != dtype or arr.strides[-1] != arr.itemsize:
        arr = np.ascontiguousarray(arr, dtype=dtype)
    return arr


class RNN(_RNNBase):
    """Elman RNN: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``, act tanh or relu."""

    mode = "RNN"

    def __init__(self, input_size, hidden_size, num_layers=1, *, nonlinearity="tanh", **options):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        if nonlinearity != "tanh" and (options.get("activations") is not None
                                       or options.get("activation") is not None):
            raise ValueError("nonlinearity: a shorthand for activations=(nonlinearity,); give "
                             "one of them")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers,
                         _cell_options={"nonlinearity": nonlinearity}, **options)
        if self.cell.plain:     # activations=("relu",) is the relu RNN
            self.nonlinearity = self.cell.activation


class LSTM(_RNNBase):
    """LSTM with PyTorch's gate order i, f, g, o; ``peephole=True`` adds p_i, p_f, p_o;
    ``proj_size=P`` (PyTorch's) makes h = W_hr (o * tanh(c)), P wide."""

    mode = "LSTM"

    def __init__(self, input_size, hidden_size, num_layers=1, *, peephole=False,
                 input_forget=False, proj_size=0, **options):
        self.peephole = _flag("peephole", peephole)
        super().__init__(input_size, hidden_size, num_layers,
                         _cell_options={"peephole": self.peephole},
                         _input_forget=input_forget, proj_size=proj_size, **options)


class GRU(_RNNBase):
    """GRU, gate order r, z, n; ``reset_after=True`` as PyTorch, False as the original GRU."""

    mode = "GRU"

    def __init__(self, input_size, hidden_size, num_layers=1, *, reset_after=True, **options):
        self.reset_after = _flag("reset_after", reset_after)
        super().__init__(input_size, hidden_size, num_layers,
                         _cell_options={"reset_after": self.reset_after}, **options)
