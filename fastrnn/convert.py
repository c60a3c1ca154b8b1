"""Weights from other frameworks into fastrnn layers.

``from_keras`` builds the fastrnn layer that computes what a Keras 3 ``LSTM``, ``GRU`` (either
``reset_after``), ``SimpleRNN`` or ``Bidirectional`` of one of them computes, from the layer's
weights (``layer.get_weights()``) and options (``layer.get_config()``); Keras itself is not
needed. The correspondence (U = units, I = input features):

    Keras 3                                   fastrnn
    inputs (B, T, I)                          batch_first=True (the default here)
    LSTM kernel (I, 4U), gates i, f, c, o     weight_ih_l0 = kernel.T (i, f, g, o: same order)
    LSTM recurrent_kernel (U, 4U)             weight_hh_l0 = recurrent_kernel.T
    LSTM bias (4U,)                           bias_ih_l0 = bias, bias_hh_l0 = 0
    GRU kernel (I, 3U), gates z, r, h         weight_ih_l0 = kernel.T, blocks as r, z, n
    GRU reset_after=True, bias (2, 3U)        reset_after=True; bias_ih_l0 = bias[0],
                                              bias_hh_l0 = bias[1], blocks as r, z, n
    GRU reset_after=False, bias (3U,)         reset_after=False; bias_ih_l0 = bias (r, z, n),
                                              bias_hh_l0 = 0
    SimpleRNN kernel (I, U), bias (U,)        RNN(nonlinearity=activation) for tanh and relu
    activation, recurrent_activation          activation=, recurrent_activation= (other than
                                              tanh and sigmoid; SimpleRNN: tanh and relu):
                                              those of layers.KERAS_ACTIVATIONS, the ones
                                              ONNX has too
    use_bias=False                            bias=False
    recurrent_dropout=p                       recurrent_dropout=p
    Bidirectional(merge_mode=m)               bidirectional=True, merge=m ("concat", "sum",
                                              "mul", "ave"); the backward layer's
                                              weights are the ``_reverse`` ones
    output, return_sequences=True             y (B, T, D*U)
    output, return_sequences=False            y[:, -1] (one direction); h_n[0] and h_n[1]
                                              merged (Bidirectional)
    return_state: h (and c)                   h_n[d], c_n[d]

Keras's ``h = z * h + (1 - z) * hh`` is fastrnn's ``h' = (1 - z) n + z h``.
``recurrent_dropout`` becomes the layer's (the same masks, one per gate block, in training
only). Options that only act in training otherwise (dropout, initializers, regularizers,
constraints) or on
what Keras returns (return_sequences, return_state, stateful, unroll) are accepted and do not
change the layer; anything else that fastrnn cannot compute (an activation that is not in
``layers.KERAS_ACTIVATIONS``, such as "selu" or "gelu", or that is not given by name,
go_backwards on a single layer, a merge_mode of None) raises an error naming the option.
"""
import numpy as np

from .layers import GRU, KERAS_ACTIVATIONS, LSTM, MERGES, RNN

__all__ = ["from_keras"]

# Keras class -> (fastrnn class, gate blocks, fastrnn's order of Keras's blocks)
_KERAS_CELLS = {"LSTM": (LSTM, 4, [0, 1, 2, 3]), "GRU": (GRU, 3, [1, 0, 2]),
                "SimpleRNN": (RNN, 1, [0])}
# options that do not change what the layer computes at inference
_INFERENCE_NEUTRAL = {
    "name", "trainable", "dtype", "return_sequences", "return_state", "stateful", "unroll",
    "zero_output_for_mask", "kernel_initializer", "recurrent_initializer", "bias_initializer",
    "unit_forget_bias", "kernel_regularizer", "recurrent_regularizer", "bias_regularizer",
    "activity_regularizer", "kernel_constraint", "recurrent_constraint", "bias_constraint",
    "dropout", "seed", "implementation", "use_cudnn"}
_CELL_OPTIONS = {"units", "activation", "recurrent_activation", "use_bias", "go_backwards",
                 "reset_after", "recurrent_dropout"}
_DEFAULTS = {"activation": "tanh", "recurrent_activation": "sigmoid", "use_bias": True,
             "go_backwards": False, "reset_after": True, "recurrent_dropout": 0.0}


def from_keras(layer, weights=None, config=None, *, dtype=None, backend="auto", batch_first=True):
    """The fastrnn layer computing what a Keras 3 recurrent layer computes.

    Either ``from_keras(keras_layer)`` (an ``LSTM``, ``GRU``, ``SimpleRNN`` or
    ``Bidirectional`` object), or ``from_keras(class_name, weights, config)`` with the class
    name ("LSTM", "GRU", "SimpleRNN", "Bidirectional"), the weight list that
    ``layer.get_weights()`` gives and the dict of options that ``layer.get_config()`` gives
    (any subset: missing ones take Keras 3's defaults; for "Bidirectional", ``layer``,
    ``backward_layer`` and ``merge_mode`` as its config has them).

    dtype: the layer's dtype; None: the weights' (float32 or float64). batch_first: True for
    Keras's (B, T, I) inputs. The layer has one layer (``num_layers=1``); stacked Keras layers
    become one fastrnn layer each.
    """
    if not isinstance(layer, str):
        if weights is not None or config is not None:
            raise TypeError("from_keras: give a Keras layer alone, or a class name with its "
                            "weights and config")
        if not (hasattr(layer, "get_weights") and hasattr(layer, "get_config")):
            raise TypeError(f"layer: expected a Keras layer or a Keras class name, got "
                            f"{type(layer).__name__}")
        return from_keras(type(layer).__name__, layer.get_weights(), layer.get_config(),
                          dtype=dtype, backend=backend, batch_first=batch_first)
    if weights is None:
        raise TypeError("weights: expected the list of arrays of layer.get_weights(), got None")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict of the layer's options (get_config()), got "
                        f"{type(config).__name__}")
    weights = [np.asarray(w) for w in weights]
    if layer == "Bidirectional":
        directions = _bidirectional(weights, config)
    elif layer in _KERAS_CELLS:
        directions = [_direction(layer, weights, config, "")]
        if directions[0]["go_backwards"]:
            raise ValueError("go_backwards: a single Keras layer with go_backwards=True has no "
                             "fastrnn layer (a reverse direction comes with a forward one, in "
                             "Bidirectional)")
    else:
        raise ValueError(f"layer: expected 'LSTM', 'GRU', 'SimpleRNN' or 'Bidirectional', "
                         f"got {layer!r}")
    first = directions[0]
    if dtype is None:
        dtype = first["dtype"] if first["dtype"] in (np.float32, np.float64) else np.float32
    merge = config.get("merge_mode", "concat") if layer == "Bidirectional" else "concat"
    m = first["class"](first["input_size"], first["units"], 1,
                       bidirectional=len(directions) == 2, merge=merge, bias=first["use_bias"],
                       batch_first=batch_first, dtype=dtype, backend=backend,
                       **first["cell_options"])
    params = {}
    for direction, d in enumerate(directions):
        suffix = "_l0" + ("_reverse" if direction else "")
        params.update({name + suffix: value for name, value in d["params"].items()})
    m.load_state_dict(params)
    return m


def _direction(kind, weights, config, where):
    """One Keras layer's weights and options, checked, as fastrnn parameters of one direction.
    ``where`` prefixes the names in errors ("layer.", "backward_layer.")."""
    cls, G, order = _KERAS_CELLS[kind]
    unknown = sorted(set(config) - _INFERENCE_NEUTRAL - _CELL_OPTIONS)
    if unknown:
        raise TypeError(f"{where}{unknown[0]}: not an option of a Keras 3 {kind} that "
                        f"from_keras knows")
    options = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _CELL_OPTIONS}}
    if kind == "SimpleRNN" and "recurrent_activation" in config:
        raise TypeError(f"{where}recurrent_activation: not an option of a Keras SimpleRNN")
    activations = ("activation",) + (() if kind == "SimpleRNN" else ("recurrent_activation",))
    for key in activations:
        value = options[key]
        if not isinstance(value, str) or value not in KERAS_ACTIVATIONS:
            raise ValueError(f"{where}{key}: fastrnn computes Keras's "
                             f"{', '.join(KERAS_ACTIVATIONS)} (the ones ONNX has too), got "
                             f"{value!r}")
    use_bias, reset_after = bool(options["use_bias"]), bool(options["reset_after"])
    if kind != "GRU" and "reset_after" in config:
        raise TypeError(f"{where}reset_after: not an option of a Keras {kind}")

    names = ["kernel", "recurrent_kernel"] + (["bias"] if use_bias else [])
    if len(weights) != len(names):
        raise ValueError(f"{where}weights: expected {len(names)} arrays ({', '.join(names)}) "
                         f"for a Keras {kind} with use_bias={use_bias}, got {len(weights)}")
    kernel, recurrent = weights[0], weights[1]
    if recurrent.ndim != 2 or recurrent.shape[1] != G * recurrent.shape[0]:
        raise ValueError(f"{where}weights[1] (recurrent_kernel): expected shape "
                         f"(units, {G}*units), got {recurrent.shape}")
    U = recurrent.shape[0]
    if "units" in options and options["units"] != U:
        raise ValueError(f"{where}units: {options['units']}, but weights[1] "
                         f"(recurrent_kernel) has shape {recurrent.shape}")
    if kernel.ndim != 2 or kernel.shape[1] != G * U:
        raise ValueError(f"{where}weights[0] (kernel): expected shape (input_features, "
                         f"{G * U}), got {kernel.shape}")
    bias_shape = (2, G * U) if kind == "GRU" and reset_after else (G * U,)
    if use_bias and weights[2].shape != bias_shape:
        raise ValueError(f"{where}weights[2] (bias): expected shape {bias_shape} for a Keras "
                         f"{kind}" + (f" with reset_after={reset_after}" if kind == "GRU" else "")
                         + f", got {weights[2].shape}")
    for i, w in enumerate(weights):
        if w.dtype.kind != "f":
            raise TypeError(f"{where}weights[{i}] ({names[i]}): expected floating-point, got "
                            f"{w.dtype}")

    def ours(w):        # Keras (rows, G*U) blocks in its order -> ours (G*U, rows)
        blocks = np.split(w, G, axis=-1)
        return np.concatenate([blocks[i] for i in order], axis=-1).T

    params = {"weight_ih": ours(kernel), "weight_hh": ours(recurrent)}
    if use_bias:
        bias = weights[2]
        if bias.ndim == 2:      # GRU reset_after: [input bias, recurrent bias]
            params["bias_ih"], params["bias_hh"] = ours(bias[0]), ours(bias[1])
        else:                   # one bias, all on the input side
            params["bias_ih"], params["bias_hh"] = ours(bias), np.zeros(G * U, bias.dtype)
    cell_options = {}
    if kind == "GRU":
        cell_options["reset_after"] = reset_after
    if kind == "SimpleRNN" and options["activation"] in ("tanh", "relu"):
        cell_options["nonlinearity"] = options["activation"]
    elif (options["activation"], options["recurrent_activation"]) != ("tanh", "sigmoid"):
        cell_options.update({key: options[key] for key in activations})
    if options["recurrent_dropout"]:     # Keras's masks are fastrnn's (one per gate block)
        cell_options["recurrent_dropout"] = options["recurrent_dropout"]
    return {"class": cls, "input_size": kernel.shape[0], "units": U, "use_bias": use_bias,
            "cell_options": cell_options, "go_backwards": bool(options["go_backwards"]),
            "params": params, "dtype": kernel.dtype, "kind": kind}


def _bidirectional(weights, config):
    """Both directions of a Keras Bidirectional: its config's ``layer`` and ``backward_layer``
    ({"class_name", "config"}, as get_config() gives them); weights forward ones first."""
    unknown = sorted(set(config) - {"name", "trainable", "dtype", "merge_mode", "layer",
                                    "backward_layer"})
    if unknown:
        raise TypeError(f"{unknown[0]}: not an option of a Keras Bidirectional that from_keras "
                        f"knows")
    merge_mode = config.get("merge_mode", "concat")
    if merge_mode not in MERGES:
        raise ValueError(f"merge_mode: expected 'concat', 'sum', 'mul' or 'ave' (fastrnn's "
                         f"merge), got {merge_mode!r}")
    forward = config.get("layer")
    if not isinstance(forward, dict) or forward.get("class_name") not in _KERAS_CELLS:
        raise ValueError(f"layer: expected {{'class_name': 'LSTM', 'GRU' or 'SimpleRNN', "
                         f"'config': {{...}}}} (Bidirectional.get_config()['layer']), got "
                         f"{forward!r}")
    backward = config.get("backward_layer") or {
        "class_name": forward["class_name"],
        "config": {**forward.get("config", {}),
                   "go_backwards": not forward.get("config", {}).get("go_backwards", False)}}
    if backward.get("class_name") != forward["class_name"]:
        raise ValueError(f"backward_layer: a {backward.get('class_name')!r} beside a forward "
                         f"{forward['class_name']!r}; fastrnn's two directions are one cell")
    if len(weights) % 2:
        raise ValueError(f"weights: expected the forward layer's then the backward layer's, "
                         f"an even number, got {len(weights)}")
    half = len(weights) // 2
    directions = [_direction(forward["class_name"], weights[:half], forward.get("config", {}),
                             "layer."),
                  _direction(backward["class_name"], weights[half:], backward.get("config", {}),
                             "backward_layer.")]
    for d, name, want in zip(directions, ("layer", "backward_layer"), (False, True)):
        if d["go_backwards"] != want:
            raise ValueError(f"{name}.go_backwards: expected {want} in a Bidirectional, got "
                             f"{d['go_backwards']}")
    for key in ("input_size", "units", "use_bias", "cell_options"):
        if directions[0][key] != directions[1][key]:
            raise ValueError(f"backward_layer: its {key} {directions[1][key]} differs from the "
                             f"forward layer's {directions[0][key]}; fastrnn's two directions "
                             f"share their sizes and options")
    return directions
