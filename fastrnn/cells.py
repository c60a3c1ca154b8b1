"""One record per cell type: every fact about a cell that the layers and the kernels need.

A *cell* is one time step. A *layer kernel* runs one cell over all T steps of one layer in one
direction. The layer classes (``fastrnn.layers``) build stacks, directions, dropout and batch-first
handling on top of the layer kernels. Parameter shapes, the state, the kernels' workspace and
cache, and which products a step makes all follow from the record; a backend adds only its
step pair per cell (forward and backward of one batch row), chosen by ``code`` in one place.

Each backend provides these functions with this argument order (the same in the reference, the
Numba and the Cython backend)::

    cache = layer_forward(cell, x, state0, params, lengths, reverse, train, y, state_n,
                          threads=None, recurrent_mask=None, zoneout=None)
    hidden = layer_backward(cell, cache, dy, dstate_n, truncate, dx, dstate0, dparams,
                            threads=None)

    concurrent_directions(T, B, train)                       (compiled backends only)
    layer_call_step(spec, params, batch_first, x, state)     (compiled backends only)

Arguments (H hidden size, G = cell.num_gates, I input size; every array has the layer's dtype):

    cell        a ``Cell`` record below
    x           (T, B, I)  layer input, C-contiguous
    state0      tuple, one (B, H) C-contiguous array per ``cell.state_names``: the initial state
    params      tuple, one array per ``cell.param_names`` with the shapes ``cell.param_shapes``:
                w_ih (G*H, I), w_hh (G*H, P), b_ih, b_hh (G*H,) (always arrays: zeros when the
                layer has no bias), then the cell's extra parameters (peephole (3, H), then
                w_hr (P, H) of a projected LSTM); P = H but in a projected cell, whose h is
                (B, P) in the states, y and their gradients, c (B, H)
    lengths     (B,) int64 every value in [0, T]; steps t >= lengths[b] are padding for row b
    reverse     bool       process t = T-1 .. 0 instead of 0 .. T-1
    train       bool       keep what backward needs and return it as the cache; else return None
    y           (T, B, H)  output, written whole (zeros at padding); may be a strided view into
                           the (T, B, D*H) layer output (unit stride along H)
    state_n     tuple like state0: the final state, written
    recurrent_mask
                None, or (G, B, H): with train, recurrent dropout, one mask per gate block (as
                Keras's): the product of gate block g is of h * recurrent_mask[g] instead of h
                (GRU reset-before: rh = r * (h * recurrent_mask[2])); the carried state is not
                masked. The cache keeps it for backward. Ignored without train.
    zoneout     None, or a tuple, one entry per state (h, then c): a rate z (the expectation:
                s = z s_old + (1 - z) s_new after each step) or a (T, B, width) 0/1 keep mask
                (training: s = k s_old + (1 - k) s_new). y is the h so mixed. The compiled
                kernels take it as one array (``zoneout_weights``).

    cache       what layer_forward returned with train=True; it refers to x, state0, params,
                lengths and reverse of that call, which backward reads again: the caller keeps
                them unchanged until its last backward (the layers pass copies)
    dy          (T, B, H)  gradient of y (may be a strided view), or None for no loss on y
    dstate_n    tuple like state0, each entry an array or None: gradient of the final state
    truncate    None or k >= 1: the gradient carried through the recurrent state between time
                indices m*k - 1 and m*k (m = 1, 2, ...) is dropped. For the forward direction this
                equals running the windows [0, k), [k, 2k), ... one after another, each with its
                own backward; the reverse direction is cut at the same time boundaries.
    dx, dstate0, dparams
                gradients, shaped like x, state0 and params; backward ADDS into them (the caller
                zeroes)
    hidden      compiled backends: (T, B, len(cell.hidden_side)*H), the gradients of the
                hidden-side blocks' recurrent products, step by step (zeros at padding; of a
                layer-normalized cell, every block's raw product h W_hh^T), a workspace read
                only until the backend's next backward call on this thread; None when the
                cell has no hidden-side block or nothing ran. The reference returns None.
    threads     None: the backend's thread count (set_num_threads); n >= 1: at most n threads
                for this call. The layers run the two directions of a bidirectional layer at
                once, one thread each, with threads=1, when the backend's
                ``concurrent_directions(T, B, train)`` says such a call makes no BLAS call
                (BLAS has its own threads) and there are threads to spare.

Padding (t >= lengths[b]): the output is zero, the state passes through unchanged, no gradient
reaches the parameters or the input from that position. The reverse direction therefore starts
at each row's own last step, and the final state is each row's state after its own last step.

The kernels check nothing that the layers (``fastrnn.layers``) and ``fastrnn.functional``, the
two public boundaries, have checked: shapes, dtypes, contiguity, lengths in range, outputs that
do not overlap inputs. They never write x, the states, the parameters, lengths or dy.

``layer_call_step`` is a layer's whole one-step call (every layer and direction, the checks, the
result arrays) in compiled code: it returns ``y, state`` as the layer's call would, or None for
anything it does not take (the layer's general path then converts or says what is wrong);
``spec`` is the layer's fixed description (``fastrnn.layers._RNNBase._step_spec``).
"""
import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Cell", "Param", "Product", "CELLS", "cell_for", "unprojected", "zoneout_weights",
           "ACTIVATIONS",
           "activation_slots"]


@dataclass(frozen=True)
class Param:
    """A parameter of one layer and direction: the kernels' name, the stem of its key in a
    layer's ``params`` (``weight_ih`` -> ``weight_ih_l0``, ``weight_ih_l0_reverse``), and its
    shape in the symbols "G*H", "H", "I" and integers."""
    name: str
    key: str
    shape: tuple


@dataclass(frozen=True)
class Product:
    """One recurrent product of a step: ``source @ w_hh[rows of blocks].T``, the hidden side of
    those gate blocks. ``source`` is "h", the state entering the step, or a buffer the step
    made in an earlier phase (GRU reset-before: "rh" = r * h). A step has one phase per
    product: phase k runs after product k."""
    source: str
    blocks: tuple


# the parameters every cell has, in this order; "P" is the width of h, the hidden size H
# except in an LSTM with a projection (PyTorch's proj_size)
WEIGHTS = (Param("w_ih", "weight_ih", ("G*H", "I")), Param("w_hh", "weight_hh", ("G*H", "P")),
           Param("b_ih", "bias_ih", ("G*H",)), Param("b_hh", "bias_hh", ("G*H",)))


@dataclass(frozen=True)
class Cell:
    """What a cell type is.

    ``saved`` names the per-step buffers the compiled kernels keep for backward besides the
    activated gates (T, B, G*H) and the state before each step (one slot per state name), each
    (name, width) of shape (T, B, width*H). ``hidden_side`` lists the gate blocks whose gradient
    on the hidden side (what w_hh, b_hh see) differs from the input side (what w_ih, b_ih, x
    see); the kernels keep that hidden side apart, (T, B, len(hidden_side)*H).
    """

    name: str               # key in CELLS
    code: int               # the integer each backend's step switch reads
    mode: str               # "RNN", "LSTM" or "GRU": the layer class it belongs to
    gate_names: tuple       # gate blocks in the weight rows (PyTorch's order); G = their number
    state_names: tuple = ("h",)   # ("h",) or ("h", "c"), each (B, H)
    products: tuple = None  # the step's recurrent products; default one, of h, over all blocks
    saved: tuple = ()       # ((name, width), ...): see above
    hidden_side: tuple = ()  # gate blocks with a hidden-side gradient of their own
    extra_params: tuple = ()  # Param records beyond WEIGHTS
    # ONNX's activations, in ONNX's order (RNN (f,), LSTM (f, g, h), GRU (f, g)), each
    # (name, alpha, beta) with ONNX's defaults filled in; None: the mode's usual ones
    activations: tuple = None
    clip: float = None      # ONNX's clip: gate pre-activations clipped to [-clip, clip]
    input_forget: bool = False  # ONNX's input_forget (LSTM): f = 1 - i
    # layer normalization (Ba, Kiros and Hinton 2016): the epsilon of its variance, None for a
    # cell without; the step's products and (LSTM) its new cell state are normalized
    layer_norm_eps: float = None
    params: tuple = field(init=False)
    # whether h is a projection of the LSTM's output, h = w_hr (o * tanh(c)) (PyTorch's
    # proj_size): h is P wide, c and the gates H; from extra_params (w_hr)
    projected: bool = field(init=False)

    def __post_init__(self):
        G = len(self.gate_names)
        if self.activations is None:
            object.__setattr__(self, "activations", DEFAULT_ACTIVATIONS[self.mode])
        if self.products is None:
            object.__setattr__(self, "products", (Product("h", tuple(range(G))),))
        object.__setattr__(self, "params", WEIGHTS + tuple(self.extra_params))
        object.__setattr__(self, "projected", any(p.name == "w_hr" for p in self.extra_params))
        covered = [b for p in self.products for b in p.blocks]
        if sorted(covered) != list(range(G)) or any(
                list(p.blocks) != list(range(p.blocks[0], p.blocks[-1] + 1))
                for p in self.products):
            raise ValueError(f"cell {self.name}: the products' blocks {covered} must cover the "
                             f"{G} gate blocks once each, every product a contiguous run")
        if self.products[0].source != "h":
            raise ValueError(f"cell {self.name}: the first product must be of h")
        if len(self.products) > 2 or (len(self.products) == 2
                                      and self.saved[:1] != ((self.products[1].source, 1),)):
            # what the kernels take: the second product reads the first H columns of saved
            raise ValueError(f"cell {self.name}: a second product's source must be the first "
                             f"saved buffer, of width 1; at most two products")
        if not set(self.hidden_side) <= set(range(G)):
            raise ValueError(f"cell {self.name}: hidden_side {self.hidden_side} is not a set of "
                             f"gate blocks 0..{G - 1}")
        for name, width in self.saved:
            if not (isinstance(width, int) and width >= 1):
                raise ValueError(f"cell {self.name}: saved buffer {name!r} needs a width >= 1, "
                                 f"got {width!r}")
        if self.state_names not in (("h",), ("h", "c")):
            raise ValueError(f"cell {self.name}: state_names must be ('h',) or ('h', 'c')")

    def __setstate__(self, state):
        # unpickled: the fields derived in __post_init__ again (a record pickled by an older
        # fastrnn may lack one)
        self.__dict__.update(state)
        self.__post_init__()

    @property
    def activation(self):
        """The name of the first activation (RNN: "tanh" or "relu")."""
        return self.activations[0][0]

    @property
    def plain(self):
        """Whether the cell has the mode's usual activations, no clip and no input_forget (and
        no layer norm): the compiled backends then run its own step pair, else the step pair
        with options (or the layer-normalized one)."""
        return self.code in PLAIN_CODES

    def option_values(self):
        """The options as the compiled step pairs with options read them, a tuple of floats:
        (clip (inf: none), input_forget (0 or 1), then per activation slot of ACTIVATION_SLOTS
        (kind, alpha, beta), kind the index in ACTIVATIONS; unused slots (-1, 0, 0)). A
        layer-normalized cell's: (eps,)."""
        if self.layer_norm:
            return (self.layer_norm_eps,)       # a layer-normalized cell has no other option
        values = [math.inf if self.clip is None else float(self.clip), float(self.input_forget)]
        for k in range(ACTIVATION_SLOTS):
            if k < len(self.activations):
                name, alpha, beta = self.activations[k]
                values += [float(ACTIVATIONS.index(name)), float(alpha), float(beta)]
            else:
                values += [-1.0, 0.0, 0.0]
        return tuple(values)

    @property
    def num_gates(self):
        return len(self.gate_names)

    @property
    def has_cell_state(self):
        return len(self.state_names) == 2

    @property
    def phases(self):
        return len(self.products)

    @property
    def layer_norm(self):
        """Whether the cell is layer-normalized (see LAYER_NORM_CODES)."""
        return self.layer_norm_eps is not None

    @property
    def norm_rows(self):
        """How many gain and shift vectors the normalization has (LSTM 6: ln_ih, ln_hh,
        ln_cell; GRU 4), 0 without; the compiled backends take them as the rows of one
        (norm_rows, G*H) array, the cell's ones in their first H entries."""
        return sum(p.name.startswith("ln_") for p in self.extra_params)

    def norm_array(self, params):
        """A layer-normalized cell's gains and shifts (``params[4:]``, in ``param_names``
        order) as the compiled backends take them: the rows of one (norm_rows, G*H) array, the
        H-wide ones in their first H entries."""
        norm = np.zeros((self.norm_rows, params[0].shape[0]), params[0].dtype)
        for row, p in zip(norm, params[4:]):
            row[:p.shape[0]] = p
        return norm

    def add_norm_gradients(self, dnorm, dparams):
        """Adds the compiled backends' gradient of ``norm_array`` (norm_rows, G*H) into
        ``dparams``: each row into its parameter's, and ln_ih's shift's into b_ih's, ln_hh's into
        b_hh's, since a bias and the shift of the product it is added to get the same gradient
        (see ``whole_rows``)."""
        for row, d in zip(dnorm, dparams[4:]):
            d += row[:d.shape[0]]
        dparams[2][...] += dnorm[1]
        dparams[3][...] += dnorm[3]

    @property
    def whole_rows(self):
        """Whether a step needs all of a batch row's units at once (a layer normalization's
        mean and variance): the compiled backends then run the batch-row loop only, never the
        unit-split loop or the one-step kernel, and take the bias gradients from the step's
        per-row sums (``add_norm_gradients``), not from their loop's sums of the gate
        gradients."""
        return self.layer_norm

    @property
    def peephole(self):
        return any(p.name == "peephole" for p in self.extra_params)

    @property
    def param_names(self):
        return tuple(p.name for p in self.params)

    def param_shapes(self, input_size, hidden_size, proj_size=0):
        """{name: shape} of one layer and direction's parameters, in ``param_names`` order;
        ``proj_size`` the width of h of a projected cell (0: none)."""
        sizes = {"G*H": self.num_gates * hidden_size, "H": hidden_size, "I": input_size,
                 "P": proj_size if self.projected else hidden_size}
        return {p.name: tuple(sizes.get(d, d) for d in p.shape) for p in self.params}

    @property
    def saved_width(self):
        """Width, in units of H, of all saved buffers together."""
        return sum(width for _, width in self.saved)

    def kernel_spec(self):
        """The record as the compiled backends read it, a tuple of ints: (code, G, states,
        saved width, block where the second product starts (G: no second product),
        hidden-side blocks, first hidden-side block)."""
        second = self.products[1].blocks[0] if self.phases > 1 else self.num_gates
        first_hidden = self.hidden_side[0] if self.hidden_side else self.num_gates
        return (self.code, self.num_gates, len(self.state_names), self.saved_width, second,
                len(self.hidden_side), first_hidden)


# ONNX's activation functions, lower case, with the default (alpha, beta) of each (ONNX's
# operators of the same name; scaledtanh and affine (1, 1) and (1, 0)). The index is the kind
# the compiled step pairs switch on.
ACTIVATIONS = ("relu", "tanh", "sigmoid", "affine", "leakyrelu", "thresholdedrelu", "scaledtanh",
               "hardsigmoid", "elu", "softsign", "softplus")
ACTIVATION_DEFAULTS = {"affine": (1.0, 0.0), "leakyrelu": (0.01, 0.0),
                       "thresholdedrelu": (1.0, 0.0), "scaledtanh": (1.0, 1.0),
                       "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}
ACTIVATION_SLOTS = 3                 # LSTM's f, g, h: the most a cell has
# what each slot is applied to, per mode (ONNX's order)
SLOT_NAMES = {"RNN": ("f",), "LSTM": ("f (gates i, f, o)", "g (cell input)", "h (cell output)"),
              "GRU": ("f (gates r, z)", "g (candidate n)")}


def zoneout_weights(zoneout, dtype, T, B, H):
    """A layer_forward call's ``zoneout`` as both compiled backends read it: the keep weights,
    one H-wide part per state, (1, 1, states*H) for rates, (T, B, states*H) with masks; None
    for no zoneout."""
    if zoneout is None:
        return None
    rates = all(np.isscalar(z) for z in zoneout)
    weights = np.empty(((1, 1) if rates else (T, B)) + (len(zoneout) * H,), dtype)
    for k, z in enumerate(zoneout):
        weights[:, :, k * H:(k + 1) * H] = z
    return weights


def _act(name):
    return (name,) + ACTIVATION_DEFAULTS.get(name, (0.0, 0.0))


DEFAULT_ACTIVATIONS = {"RNN": (_act("tanh"),),
                       "LSTM": (_act("sigmoid"), _act("tanh"), _act("tanh")),
                       "GRU": (_act("sigmoid"), _act("tanh"))}


def activation_slots(mode, activations):
    """``activations`` as a layer takes it (a tuple of names or (name, alpha) / (name, alpha,
    beta) tuples, in ONNX's order, one per slot of the mode) resolved into the record's form,
    ((name, alpha, beta), ...) with ONNX's defaults; refused with a message that names what is
    wrong."""
    slots = SLOT_NAMES[mode]
    if isinstance(activations, (str, bytes)) or not isinstance(activations, (tuple, list)) \
            or len(activations) != len(slots):
        raise ValueError(f"activations: expected a tuple of {len(slots)} activation"
                         f"{'s' if len(slots) > 1 else ''} for {mode}, one for each of "
                         f"{', '.join(slots)}, got {activations!r}")
    resolved = []
    for slot, entry in zip(slots, activations):
        if isinstance(entry, str):
            entry = (entry,)
        if not isinstance(entry, (tuple, list)) or not 1 <= len(entry) <= 3 \
                or not isinstance(entry[0], str):
            raise ValueError(f"activations: the {slot} entry must be a name or (name, alpha) "
                             f"or (name, alpha, beta), got {entry!r}")
        name = entry[0].lower()
        if name not in ACTIVATIONS:
            raise ValueError(f"activations: unknown activation {entry[0]!r} for {slot}; "
                             f"expected one of {', '.join(ACTIVATIONS)}")
        defaults = ACTIVATION_DEFAULTS.get(name, (0.0, 0.0))
        values = list(defaults)
        for k, v in enumerate(entry[1:]):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"activations: {'alpha' if k == 0 else 'beta'} of {name!r} "
                                 f"must be a finite number, got {v!r}")
            values[k] = float(v)
        if len(entry) > 1 and name not in ACTIVATION_DEFAULTS and any(entry[1:]):
            # (name, 0.0, 0.0), the record's own form, is taken back
            raise ValueError(f"activations: {name!r} takes no alpha or beta, got {entry!r}")
        if len(entry) > 2 and name in ("leakyrelu", "thresholdedrelu", "elu"):
            raise ValueError(f"activations: {name!r} takes alpha only, got {entry!r}")
        resolved.append((name, values[0], values[1]))
    return tuple(resolved)


_PEEPHOLE = Param("peephole", "peephole", (3, "H"))   # rows i, f, o
_PROJECTION = Param("w_hr", "weight_hr", ("P", "H"))  # h = w_hr (o * tanh(c)), PyTorch's

RNN_TANH = Cell("rnn_tanh", 0, "RNN", ("h",))
RNN_RELU = Cell("rnn_relu", 1, "RNN", ("h",), activations=(_act("relu"),))
LSTM = Cell("lstm", 2, "LSTM", ("i", "f", "g", "o"), ("h", "c"))
LSTM_PEEPHOLE = Cell("lstm_peephole", 3, "LSTM", ("i", "f", "g", "o"), ("h", "c"),
                     extra_params=(_PEEPHOLE,))
# reset_after=True: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); keeps hn = W_hn h + b_hn per
# step; the n block's hidden-side gradient is da_n * r, its input side da_n.
GRU = Cell("gru", 4, "GRU", ("r", "z", "n"), saved=(("hn", 1),), hidden_side=(2,))
# reset_after=False: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn): a second product, of r * h,
# for the n block, after the phase that makes r; keeps rh = r * h per step.
GRU_RESET_BEFORE = Cell("gru_reset_before", 5, "GRU", ("r", "z", "n"),
                        products=(Product("h", (0, 1)), Product("rh", (2,))),
                        saved=(("rh", 1),))

CELLS = {c.name: c for c in (RNN_TANH, RNN_RELU, LSTM, LSTM_PEEPHOLE, GRU, GRU_RESET_BEFORE)}

# Layer-normalized cells (Ba, Kiros and Hinton 2016, section 3.1): the input product W_ih x and
# the recurrent product W_hh h are each normalized over the step's G*H gate pre-activations,
# with a gain and a shift of their own, before the biases are added:
#     a = LN(W_ih x; ln_ih) + LN(W_hh h; ln_hh) + b_ih + b_hh
# LSTM: c' = f c + i g as usual, and h' = o tanh(LN(c'; ln_cell)) over the H units; the
# carried c' is not normalized. GRU reset after: the n block's recurrent part is the
# normalized product's n block (plus b_hn), which r then multiplies. GRU reset before: its two
# products are normalized apart (r, z over 2H, the n block's product of r * h over H); the
# input product over all 3H. LN(v; w) = (v - mean(v)) / sqrt(var(v) + eps) * w.weight +
# w.bias, var the biased variance, eps ``layer_norm_eps``. Gains start at 1, shifts at 0.
# The records keep the raw products of each step ("ax", "ah") for backward, which recomputes
# the means and variances from them.
LAYER_NORM_CODES = {"LSTM": 9, "GRU": 10}
LAYER_NORM_EPS = 1e-5
_LN_PARAMS = {
    "LSTM": tuple(Param(f"ln_{part}_{kind}", f"ln_{part}_{kind}", (size,))
                  for part, size in (("ih", "G*H"), ("hh", "G*H"), ("cell", "H"))
                  for kind in ("weight", "bias")),
    "GRU": tuple(Param(f"ln_{part}_{kind}", f"ln_{part}_{kind}", ("G*H",))
                 for part in ("ih", "hh") for kind in ("weight", "bias")),
}
PLAIN_CODES = tuple(c.code for c in CELLS.values())

# The step pairs with options (ONNX's activations, clip, input_forget), one per mode: a cell
# with options is its plain record with one of these codes. Its step pairs keep the gates'
# pre-activations (unclipped) in the gates buffer, not the activated gates, and take the
# activations and their slopes from them.
OPTIONS_CODES = {"RNN": 6, "LSTM": 7, "GRU": 8}


def cell_for(mode, nonlinearity="tanh", peephole=False, reset_after=True, activations=None,
             clip=None, input_forget=False, projected=False, layer_norm_eps=None):
    """The cell record a layer class with these options uses (``activations`` already
    resolved by ``activation_slots``; ``projected``: an LSTM with PyTorch's proj_size;
    ``layer_norm_eps``: a layer-normalized LSTM or GRU, see LAYER_NORM_CODES)."""
    cell = _options_cell(mode, nonlinearity, peephole, reset_after, activations, clip,
                         input_forget)
    if layer_norm_eps is not None:
        cell = _layer_norm_cell(cell, layer_norm_eps)
    if projected:
        if mode != "LSTM":
            raise ValueError(f"projected: only LSTM cells have a projection, not {mode}")
        cell = dataclasses.replace(cell, extra_params=cell.extra_params + (_PROJECTION,))
    return cell


@functools.lru_cache(maxsize=None)
def unprojected(cell):
    """The record of ``cell`` without its projection: what the compiled backends run a projected
    cell as (see ``fastrnn.projection``); made once per record, not on every call."""
    return dataclasses.replace(cell, extra_params=tuple(p for p in cell.extra_params
                                                        if p.name != "w_hr"))


def _layer_norm_cell(cell, eps):
    if cell.mode not in LAYER_NORM_CODES:
        raise ValueError(f"layer_norm: only LSTM and GRU cells are layer-normalized, not "
                         f"{cell.mode}")
    if not cell.plain:
        raise ValueError("layer_norm: not with ONNX's activations, clip or input_forget")
    if cell.peephole:
        raise ValueError("layer_norm: not with peephole connections")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise ValueError(f"layer_norm_eps: expected a positive finite number, got {eps!r}")
    G = cell.num_gates
    return dataclasses.replace(cell, code=LAYER_NORM_CODES[cell.mode], layer_norm_eps=float(eps),
                               extra_params=cell.extra_params + _LN_PARAMS[cell.mode],
                               saved=cell.saved + (("ax", G), ("ah", G)),
                               hidden_side=tuple(range(G)))


def _options_cell(mode, nonlinearity, peephole, reset_after, activations, clip, input_forget):
    if mode == "RNN":
        cell = RNN_TANH if nonlinearity == "tanh" else RNN_RELU
    elif mode == "LSTM":
        cell = LSTM_PEEPHOLE if peephole else LSTM
    elif mode == "GRU":
        cell = GRU if reset_after else GRU_RESET_BEFORE
    else:
        raise ValueError(f"mode: expected 'RNN', 'LSTM' or 'GRU', got {mode!r}")
    if activations is None:
        activations = cell.activations
    if mode == "RNN" and tuple(activations) == RNN_RELU.activations:
        cell = RNN_RELU             # activations=("relu",) is nonlinearity="relu"
    if activations == cell.activations and clip is None and not input_forget:
        return cell
    return dataclasses.replace(cell, code=OPTIONS_CODES[mode], activations=tuple(activations),
                               clip=None if clip is None else float(clip),
                               input_forget=bool(input_forget))
