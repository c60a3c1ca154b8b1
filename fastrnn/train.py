"""What it takes to train a recurrent stack: the layers around it, losses, optimizers, gradient
clipping and a truncated back-propagation-through-time driver.

Everything here follows the layer API of ``fastrnn.LSTM`` / ``GRU`` / ``RNN``:

    y, cache = m.forward(x, train=True)      # Embedding, Linear (no recurrent state)
    dx = m.backward(dy, cache)               # ADDS into m.grads; the caller zeroes (m.zero_grad())
    m.params, m.grads                        # dicts with the same keys (PyTorch's names)
    m.state_dict(), m.load_state_dict(d)

Losses return ``(loss, dlogits)``: the loss as a Python float and its gradient with respect to the
prediction, a new array. Optimizers update a params dict in place from a grads dict. Clipping
rescales a grads dict in place. Nothing here writes an array the caller passed in as data.
"""
from collections import namedtuple
import math
import numbers

import numpy as np

__all__ = [
    "Embedding", "Linear",
    "softmax_cross_entropy", "mse_loss",
    "SGD", "Adam",
    "clip_grad_norm", "clip_grad_value", "global_norm",
    "TruncatedBPTT", "Update", "NonFiniteGradientError",
]

_FLOATS = (np.float32, np.float64)


# ---------------------------------------------------------------------------------------------
# validation helpers: every message names the argument, what was expected and what came

def _check_dtype(dtype):
    dt = np.dtype(dtype)
    if dt.type not in _FLOATS:
        raise TypeError(f"dtype: expected float32 or float64, got {dt}")
    return dt


def _positive_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _nonnegative_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    return int(value)


def _as_float_array(name, a, dtype):
    """``a`` as an array of ``dtype`` (other floating dtypes are cast); never a view we write."""
    arr = np.asarray(a)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _as_index_array(name, a, size=None):
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got dtype {arr.dtype}")
    if size is not None and arr.size:
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: expected values in [0, {size}), got {bad}")
    return arr


class _Module:
    """params/grads dicts, zero_grad and state dicts, as in the recurrent layers."""

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def state_dict(self):
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict):
        """Copy the arrays of ``state_dict`` into the parameters (in place: optimizers built on
        ``params`` keep working); all are checked before any is written."""
        _load_arrays("state_dict", state_dict, self.params)


def _check_same_keys(name, got, expected):
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    if missing or extra:
        raise KeyError(f"{name}: expected the keys {sorted(expected)}, "
                       f"missing {sorted(missing)}, unexpected {sorted(extra)}")


# ---------------------------------------------------------------------------------------------
# Embedding:  y[..., :] = weight[idx[...], :]

class Embedding(_Module):
    """A lookup table, ``weight`` of shape ``(num_embeddings, embedding_dim)``, initialised
    N(0, 1) like PyTorch's. Input: integer indices of any shape; output: that shape + (E,)."""

    def __init__(self, num_embeddings, embedding_dim, *, dtype=np.float32, seed=None):
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = _positive_int("embedding_dim", embedding_dim)
        self.dtype = _check_dtype(dtype)
        rng = np.random.default_rng(seed)
        weight = rng.standard_normal((self.num_embeddings, self.embedding_dim))  # (V, E)
        self.params = {"weight": weight.astype(self.dtype)}
        self.grads = {"weight": np.zeros_like(self.params["weight"])}

    def __call__(self, idx):
        return self.forward(idx, train=False)[0]

    def forward(self, idx, train=True):
        idx = _as_index_array("idx", idx, self.num_embeddings)
        y = self.params["weight"][idx]                    # (*idx.shape, E), a new array
        return y, (idx if train else None)

    def backward(self, dy, cache):
        """Adds into ``grads['weight']``; returns None (indices have no gradient)."""
        idx = cache
        dy = _as_float_array("dy", dy, self.dtype)
        if dy.shape != idx.shape + (self.embedding_dim,):
            raise ValueError(f"dy: expected shape {idx.shape + (self.embedding_dim,)}, "
                             f"got {dy.shape}")
        # y = weight[idx]: each row of dy goes to the row of weight it was read from
        np.add.at(self.grads["weight"], idx.reshape(-1), dy.reshape(-1, self.embedding_dim))
        return None


# ---------------------------------------------------------------------------------------------
# Linear:  y = x W^T + b

class Linear(_Module):
    """A dense layer over the last axis: ``weight`` (out, in), ``bias`` (out,), both initialised
    uniform(-1/sqrt(in), 1/sqrt(in)) as PyTorch does. Input ``(..., in)``, output ``(..., out)``."""

    def __init__(self, in_features, out_features, *, bias=True, dtype=np.float32, seed=None):
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.dtype = _check_dtype(dtype)
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.in_features)
        self.params = {"weight": rng.uniform(-bound, bound, (self.out_features, self.in_features))
                       .astype(self.dtype)}
        if bias:
            self.params["bias"] = rng.uniform(-bound, bound, self.out_features).astype(self.dtype)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    def __call__(self, x):
        return self.forward(x, train=False)[0]

    def forward(self, x, train=True):
        x = _as_float_array("x", x, self.dtype)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape (..., {self.in_features}), got {x.shape}")
        y = x @ self.params["weight"].T                   # (..., out)
        if "bias" in self.params:
            y += self.params["bias"]
        return y, (x if train else None)

    def backward(self, dy, cache):
        """Adds into ``grads``; returns dx of the input's shape."""
        x = cache
        dy = _as_float_array("dy", dy, self.dtype)
        if dy.shape != x.shape[:-1] + (self.out_features,):
            raise ValueError(f"dy: expected shape {x.shape[:-1] + (self.out_features,)}, "
                             f"got {dy.shape}")
        dy2 = dy.reshape(-1, self.out_features)          # (N, out)
        x2 = x.reshape(-1, self.in_features)             # (N, in)
        self.grads["weight"] += dy2.T @ x2
        if "bias" in self.params:
            self.grads["bias"] += dy2.sum(axis=0)
        return dy @ self.params["weight"]                 # (..., in)


# ---------------------------------------------------------------------------------------------
# losses: (loss as a float, gradient with respect to the prediction)

def _counted_positions(name_mask, mask, ignore_index, targets):
    counted = np.ones(targets.shape, dtype=bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool:
            raise TypeError(f"{name_mask}: expected a boolean array, got dtype {m.dtype}")
        if m.shape != targets.shape:
            raise ValueError(f"{name_mask}: expected shape {targets.shape}, got {m.shape}")
        counted &= m
    if ignore_index is not None:
        counted &= targets != ignore_index
    return counted


def softmax_cross_entropy(logits, targets, mask=None, ignore_index=None):
    """Softmax cross-entropy (natural log) averaged over the counted positions.

    logits   (..., C) floating; the gradient has the same dtype (float32 or float64)
    targets  (...) integer class indices in [0, C) wherever counted
    mask     optional boolean (...) array: True where the position counts
    ignore_index  optional int: positions whose target equals it do not count

    Returns ``(loss, dlogits)`` with ``loss = -mean over counted positions of log softmax(logits)
    [target]`` and ``dlogits = (softmax(logits) - onehot(target)) / N`` at counted positions, zero
    elsewhere. With no counted position the loss is 0 and the gradient zero.
    """
    logits = np.asarray(logits)
    if logits.dtype.kind != "f":
        raise TypeError(f"logits: expected a floating-point array, got dtype {logits.dtype}")
    if logits.dtype.type not in _FLOATS:
        logits = logits.astype(np.float64)
    if logits.ndim < 1:
        raise ValueError(f"logits: expected shape (..., C), got {logits.shape}")
    targets = _as_index_array("targets", targets)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets: expected shape {logits.shape[:-1]} (logits without the "
                         f"class axis), got {targets.shape}")
    C = logits.shape[-1]
    counted = _counted_positions("mask", mask, ignore_index, targets)
    n = int(counted.sum())
    if n and (targets[counted].min() < 0 or targets[counted].max() >= C):
        bad = targets[counted][(targets[counted] < 0) | (targets[counted] >= C)][0]
        raise ValueError(f"targets: expected values in [0, {C}) at counted positions, got {bad}")
    dlogits = np.zeros_like(logits)
    if n == 0:
        return 0.0, dlogits
    z = logits[counted]                                   # (n, C)
    z = z - z.max(axis=1, keepdims=True)
    exp_z = np.exp(z)
    sum_exp = exp_z.sum(axis=1, keepdims=True)
    t = targets[counted]
    # loss = -(z_t - log sum exp z)
    log_p_target = z[np.arange(n), t] - np.log(sum_exp[:, 0])
    loss = -float(np.sum(log_p_target, dtype=np.float64)) / n
    # dloss/dz = (softmax(z) - onehot(t)) / n
    d = exp_z / sum_exp
    d[np.arange(n), t] -= 1
    d /= n
    dlogits[counted] = d
    return loss, dlogits


def mse_loss(pred, target, mask=None):
    """Mean squared error over the counted elements.

    pred, target  same shape, floating; the gradient has pred's dtype (float32 or float64)
    mask          optional boolean array whose shape is a leading part of pred's shape
                  (e.g. (T, B) for (T, B, F)); False rows do not count

    Returns ``(loss, dpred)``: ``loss = sum(m * (pred - target)**2) / N`` over the N counted
    elements and ``dpred = 2 * m * (pred - target) / N``.
    """
    pred = np.asarray(pred)
    if pred.dtype.kind != "f":
        raise TypeError(f"pred: expected a floating-point array, got dtype {pred.dtype}")
    if pred.dtype.type not in _FLOATS:
        pred = pred.astype(np.float64)
    target = _as_float_array("target", target, pred.dtype)
    if target.shape != pred.shape:
        raise ValueError(f"target: expected shape {pred.shape} (as pred), got {target.shape}")
    diff = pred - target
    if mask is None:
        n = diff.size
        weight = None
    else:
        m = np.asarray(mask)
        if m.dtype != bool:
            raise TypeError(f"mask: expected a boolean array, got dtype {m.dtype}")
        if m.shape != pred.shape[:m.ndim]:
            raise ValueError(f"mask: expected a leading part of pred's shape {pred.shape}, "
                             f"got {m.shape}")
        weight = m.reshape(m.shape + (1,) * (pred.ndim - m.ndim))
        n = int(m.sum()) * int(np.prod(pred.shape[m.ndim:], dtype=np.int64))
        diff = np.where(weight, diff, 0)
    if n == 0:
        return 0.0, np.zeros_like(pred)
    loss = float(np.sum(diff * diff, dtype=np.float64)) / n
    dpred = (2.0 / n) * diff
    return loss, dpred.astype(pred.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# optimizers: update a params dict in place from a grads dict with the same keys

def _real(name, value, accept, expected):
    """``value`` as a float if it is a real number (not a bool or a string) that ``accept``
    takes; otherwise an error naming ``name``, what was ``expected`` and what came."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {value!r} "
                        f"({type(value).__name__})")
    if not accept(float(value)):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def _positive_real(name, value):
    return _real(name, value, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def _grad_arrays(grads, params):
    """Every gradient of ``grads`` as an array of its parameter's dtype, all checked before any
    is used, so that a bad one changes nothing."""
    _check_same_keys("grads", grads, params)
    checked = {}
    for k, p in params.items():
        g = np.asarray(grads[k])
        if g.dtype.kind != "f":
            raise TypeError(f"grads[{k!r}]: expected a floating-point array, got dtype {g.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{k!r}]: expected shape {p.shape}, got {g.shape}")
        checked[k] = g.astype(p.dtype, copy=False)
    return checked


def _load_arrays(name, got, expected):
    """Copy ``got[k]`` into the array ``expected[k]`` for every key (in place, so whatever holds
    those arrays keeps working), after checking them all: a bad one changes nothing."""
    _check_same_keys(name, got, expected)
    arrays = {}
    for k, dest in expected.items():
        v = np.asarray(got[k])
        if v.shape != dest.shape:
            raise ValueError(f"{name}[{k!r}]: expected shape {dest.shape}, got {v.shape}")
        if v.dtype.kind not in "fiu":
            raise TypeError(f"{name}[{k!r}]: expected a real array, got dtype {v.dtype}")
        arrays[k] = v
    for k, v in arrays.items():
        expected[k][...] = v


class _Optimizer:
    def __init__(self, params, lr, weight_decay):
        if not isinstance(params, dict) or not params:
            got = "an empty dict" if isinstance(params, dict) else type(params).__name__
            raise TypeError(f"params: expected a non-empty dict of arrays, got {got}")
        for k, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
                raise TypeError(f"params[{k!r}]: expected a floating-point numpy array, "
                                f"got {type(p).__name__}")
            if not p.flags.writeable:
                raise ValueError(f"params[{k!r}]: expected a writeable array (updated in place), "
                                 "got a read-only one")
        self.params = params
        self.lr = _positive_real("lr", lr)
        self.weight_decay = _real("weight_decay", weight_decay,
                                  lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
        self.steps = 0

    def step(self, grads):
        """One update from ``grads`` (same keys and shapes as ``params``). Every gradient is
        checked before anything changes."""
        checked = _grad_arrays(grads, self.params)
        self.steps += 1
        for k, g in checked.items():
            if self.weight_decay:
                g = g + self.weight_decay * self.params[k]   # L2 penalty (weight_decay/2)|p|^2
            self._update(k, g)

    def _buffers(self):
        """name -> {parameter name -> array}: the optimizer's state besides ``steps``."""
        return {}

    def state_dict(self):
        """The optimizer's state (``steps`` and its buffers, copied); with the parameters it
        continues a run exactly (``load_state_dict``)."""
        return {"steps": self.steps,
                **{name: {k: v.copy() for k, v in buffers.items()}
                   for name, buffers in self._buffers().items()}}

    def load_state_dict(self, state):
        """Restore what ``state_dict`` returned, in place; all is checked before anything
        is written."""
        buffers = self._buffers()
        _check_same_keys("state", state, ["steps", *buffers])
        steps = state["steps"]
        if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, numbers.Integral) \
                or steps < 0:
            raise ValueError(f"state['steps']: expected an integer >= 0, got {steps!r}")
        for name, own in buffers.items():
            _check_same_keys(f"state[{name!r}]", state[name], own)
        for name, own in buffers.items():
            _load_arrays(f"state[{name!r}]", state[name], own)
        self.steps = int(steps)


class SGD(_Optimizer):
    """Stochastic gradient descent with momentum, as PyTorch's ``SGD`` (no dampening)::

        buf = g                      on the first step
        buf = momentum * buf + g     after it
        p  -= lr * buf               (nesterov: p -= lr * (g + momentum * buf))

    where ``g = grad + weight_decay * p``.
    """

    def __init__(self, params, lr, momentum=0.0, *, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self.momentum = _real("momentum", momentum, lambda v: 0 <= v < 1, "a number in [0, 1)")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov: expected momentum > 0 with nesterov=True, got momentum=0")
        self.nesterov = bool(nesterov)
        # momentum buffers, zero until the first step sets them to the gradient
        self.buffers = ({k: np.zeros_like(p) for k, p in params.items()} if self.momentum
                        else {})

    def _buffers(self):
        return {"buffers": self.buffers} if self.momentum else {}

    def _update(self, k, g):
        p = self.params[k]
        if self.momentum == 0:
            p -= self.lr * g
            return
        buf = self.buffers[k]
        if self.steps == 1:
            buf[...] = g
        else:
            buf *= self.momentum
            buf += g
        p -= self.lr * (g + self.momentum * buf if self.nesterov else buf)


class Adam(_Optimizer):
    """Adam (Kingma & Ba), as PyTorch's ``Adam``; at step t (from 1)::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        p -= lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)

    where ``g = grad + weight_decay * p`` and m, v start at zero. ``eps`` must be positive: a
    parameter whose gradient has always been zero has v = m = 0, and 0 / 0 is NaN.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas: expected two numbers in [0, 1) (beta1, beta2), "
                             f"got {betas!r}")
        self.beta1, self.beta2 = (_real(f"betas[{i}]", b, lambda v: 0 <= v < 1,
                                        "a number in [0, 1)") for i, b in enumerate(betas))
        self.eps = _real("eps", eps, lambda v: math.isfinite(v) and v > 0,
                         "a positive finite number (0 gives 0/0 = NaN where a gradient "
                         "has been zero)")
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}

    def _buffers(self):
        return {"m": self.m, "v": self.v}

    def _update(self, k, g):
        p, m, v = self.params[k], self.m[k], self.v[k]
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * (g * g)
        step_size = self.lr / (1 - self.beta1 ** self.steps)
        denom = np.sqrt(v / (1 - self.beta2 ** self.steps))
        denom += self.eps
        p -= step_size * (m / denom)


# ---------------------------------------------------------------------------------------------
# gradient clipping (in place on a grads dict)

def global_norm(grads):
    """The L2 norm of all arrays of ``grads`` taken together, as a float (summed in float64).
    Finite whenever every element is finite: sums that overflow are taken again scaled."""
    arrays = [np.asarray(g) for g in grads.values()]
    with np.errstate(over="ignore"):
        total = sum(float(np.sum(np.square(g, dtype=np.float64))) for g in arrays)
    if math.isinf(total):
        biggest = max(float(np.max(np.abs(g), initial=0.0)) for g in arrays)
        if math.isfinite(biggest):
            return biggest * math.sqrt(sum(float(np.sum(np.square(g / biggest, dtype=np.float64)))
                                           for g in arrays))
    return math.sqrt(total)


def _check_writeable(grads):
    for k, g in grads.items():
        if not (isinstance(g, np.ndarray) and g.flags.writeable):
            got = "a read-only one" if isinstance(g, np.ndarray) else type(g).__name__
            raise ValueError(f"grads[{k!r}]: expected a writeable numpy array (clipped in "
                             f"place), got {got}")


def clip_grad_norm(grads, max_norm):
    """Scale every array of ``grads`` in place by ``max_norm / norm`` when the global norm (all
    arrays together) exceeds ``max_norm``; returns the norm before clipping. A non-finite norm
    leaves the gradients as they are (the caller decides whether to skip the step)."""
    max_norm = _positive_real("max_norm", max_norm)
    _check_writeable(grads)
    norm = global_norm(grads)
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / norm
        for g in grads.values():
            g *= scale
    return norm


def clip_grad_value(grads, clip_value):
    """Clip every element of every array of ``grads`` to ``[-clip_value, clip_value]`` in place."""
    clip_value = _positive_real("clip_value", clip_value)
    _check_writeable(grads)
    for g in grads.values():
        np.clip(g, -clip_value, clip_value, out=g)


# ---------------------------------------------------------------------------------------------
# truncated back-propagation through time

Update = namedtuple("Update", "loss grad_norm steps skipped", defaults=(False,))
Update.__doc__ = """One update of the driver: the window's mean loss, the global gradient norm
before clipping, the number of time steps the window had, and whether the update was skipped
because the gradient was not finite (the parameters were left as they were)."""


class NonFiniteGradientError(FloatingPointError):
    """Too many updates in a row had a non-finite gradient (``TruncatedBPTT(max_skipped=)``)."""


def _time_slice(a, start, stop, axis):
    return a[start:stop] if axis == 0 else a[:, start:stop]


def _copy_state(state):
    """A copy of a recurrent state: None, an array, or a tuple of arrays (LSTM's (h, c))."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(np.array(part) for part in state)
    return np.array(state)


def _all_finite(arrays):
    return all(np.isfinite(a).all() for a in arrays if a is not None)


def _state_parts(state):
    return state if isinstance(state, tuple) else (state,)


class TruncatedBPTT:
    """Truncated back-propagation through time, BPTT(k1, k2) with k2 >= k1 (Williams & Peng).

    The driver walks long streams in windows of ``k1`` time steps, carrying the recurrent state
    from one window to the next, and makes one optimizer update per window.

    Precisely: number the steps of the stream 0, 1, ... from the last ``reset()``. Window n covers
    the steps ``[s, e)`` with ``s = n * k1`` (``e = s + k1``, or the stream's end). Let
    ``b = max(0, s - (k2 - k1))``. Update n minimises the mean loss over the positions of the
    window::

        L_n(theta) = loss(model outputs at steps [s, e), targets at [s, e))

    where the outputs come from running the model over the steps ``[b, e)`` from the state at step
    ``b`` held fixed. Its gradient therefore reaches back through the window and the ``k2 - k1``
    steps before it: the loss at the window's last step is back-propagated ``k2`` steps, the loss
    at its first ``k2 - k1 + 1``. With ``k2 == k1`` this is plain truncated BPTT: independent
    windows joined only by the carried state. The state at ``b`` is the one the previous updates'
    forward passes computed (with the parameters of their time; at ``b = 0`` the reset state), so
    no step is run forward more than ``ceil(k2 / k1)`` times. The driver keeps its own copy of
    the inputs of those ``k2 - k1`` steps: the caller may reuse its buffers.

    The gradient is then clipped (``clip_norm``: global norm; ``clip_value``: elementwise) and the
    optimizer steps. The loss and its gradient come from ``loss(y, target) -> (loss, dy)`` (see
    ``softmax_cross_entropy``, ``mse_loss``); ``target`` is sliced along time like ``x``.

    A gradient that is not finite (NaN or infinity anywhere) is never applied: the update is
    skipped (``Update.skipped``, counted in ``skipped``), the window counts as read, the history
    before it is dropped and a non-finite carried state is replaced by the zero state. After
    ``max_skipped`` skipped updates in a row (None: no limit) the next one raises
    ``NonFiniteGradientError`` instead.

    ``model`` is any object with the layer API: a fastrnn ``LSTM``, ``GRU`` or ``RNN`` (any
    backend, ``batch_first`` or not: time is axis 1 when ``model.batch_first`` is true, else 0),
    ``fastrnn.charlm.CharLM``, or your own::

        y, state, cache = model.forward(x, state, train=True)
        dx, dstate = model.backward(dy, cache, dstate=dstate)   # dy may be None; ADDS into grads
        model.grads, model.zero_grad()

    and ``optimizer`` has ``step(grads)`` (``SGD``, ``Adam``) and was built on ``model.params``.
    ``state_dict()`` / ``load_state_dict()`` save and restore the driver's place in the stream,
    the carried state and the optimizer's state, so a run continues exactly.

    ``comm`` (an mpi4py communicator; see ``fastrnn.distributed``): data-parallel training.
    Each rank passes its share of the batch; the gradients are averaged over the ranks before
    clipping and the step (``GradientAllreduce``), the loss of an ``Update`` is the ranks'
    mean and an update is skipped on every rank when any rank's gradient is not finite, so all
    ranks keep the same parameters. A model with ``grad_buckets()`` (``CharLM``) takes
    ``grads_ready=`` in ``backward`` and its buckets are reduced while backward runs on.
    """

    def __init__(self, model, loss, optimizer, k1, k2=None, *, clip_norm=None, clip_value=None,
                 max_skipped=10, comm=None):
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.k1 = _positive_int("k1", k1)
        self.k2 = self.k1 if k2 is None else _positive_int("k2", k2)
        if self.k2 < self.k1:
            raise ValueError(f"k2: expected k2 >= k1 = {self.k1}, got {self.k2}")
        self.clip_norm = None if clip_norm is None else _positive_real("clip_norm", clip_norm)
        self.clip_value = None if clip_value is None else _positive_real("clip_value", clip_value)
        self.max_skipped = (None if max_skipped is None
                            else _nonnegative_int("max_skipped", max_skipped))
        self.time_axis = 1 if getattr(model, "batch_first", False) else 0
        self.skipped = 0                # updates skipped for a non-finite gradient, in all
        self.skipped_in_a_row = 0
        self.grad_sync = None
        if comm is not None:
            from .distributed import GradientAllreduce
            buckets = model.grad_buckets() if hasattr(model, "grad_buckets") else None
            self.grad_sync = GradientAllreduce(comm, model.grads, buckets)
        self.reset()

    def reset(self, state=None):
        """Start a new stream from ``state`` (None: zeros)."""
        self.position = 0           # steps consumed since the reset
        self._history_start = 0     # no update back-propagates to steps before this one
        self._span_state = state    # the state at step b of the next update
        self._span_x = None         # inputs at steps [b, position) of the next update (a copy)
        self.state = state          # the state after the last step consumed

    def step(self, x, target):
        """One update on the next window ``x`` (its time length is the window's; ``run`` cuts
        windows of k1 steps) with ``target`` for its outputs. Returns an ``Update``."""
        ax = self.time_axis
        x = np.asarray(x)
        if x.ndim <= ax or x.shape[ax] < 1:
            raise ValueError(f"x: expected at least one time step along axis {ax}, "
                             f"got shape {x.shape}")
        L = x.shape[ax]
        target = np.asarray(target)
        if target.ndim <= ax or target.shape[ax] != L:
            raise ValueError(f"target: expected {L} time steps along axis {ax} (as x), "
                             f"got shape {target.shape}")
        s, e = self.position, self.position + L
        extra = self.k2 - self.k1
        b = max(self._history_start, s - extra)       # the span [b, e) is run and back-propagated
        b_next = max(self._history_start, e - extra)  # where the next update's span starts
        if self._span_x is None:
            span_x = x
        else:
            span_x = np.concatenate([self._span_x, x], axis=ax)
        # local indices in the span; run it in pieces so that the state at b_next is seen
        cuts = sorted({0, b_next - b, s - b, e - b})
        state = self._span_state
        next_span_state = state if b_next == b else None
        pieces = []                                       # (start, stop, cache) in span order
        ys = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            y, state, cache = self.model.forward(_time_slice(span_x, lo, hi, ax), state,
                                                 train=True)
            pieces.append((lo, hi, cache))
            if lo >= s - b:
                ys.append(y)
            if hi == b_next - b:
                next_span_state = state
        y_window = ys[0] if len(ys) == 1 else np.concatenate(ys, axis=ax)
        loss, dy_window = self.loss(y_window, target)

        self.model.zero_grad()
        sync = self.grad_sync
        if sync is not None:
            sync.begin()
        dstate = None
        for lo, hi, cache in reversed(pieces):
            dy = None
            if lo >= s - b:
                dy = _time_slice(dy_window, lo - (s - b), hi - (s - b), ax)
            hook = {}
            if sync is not None and lo == 0 and hasattr(self.model, "grad_buckets"):
                hook = {"grads_ready": sync.ready}      # the last backward: gradients final
            _, dstate = self.model.backward(dy, cache, dstate=dstate, **hook)
        grads = self.model.grads
        if sync is not None:
            sync.finish()
        norm = global_norm(grads)
        if sync is not None:
            # every rank must skip alike; the loss reported is the whole batch's
            loss_sum, nonfinite = sync.agree([loss, not math.isfinite(norm)])
            loss = float(loss_sum) / sync.comm.size
            if nonfinite and math.isfinite(norm):
                norm = math.inf
        if not math.isfinite(norm):
            return self._skip(loss, norm, L, state, e)
        self.skipped_in_a_row = 0
        if self.clip_value is not None:
            clip_grad_value(grads, self.clip_value)
        if self.clip_norm is not None:
            clip_grad_norm(grads, self.clip_norm)
        self.optimizer.step(grads)

        self.position = e
        self.state = state
        self._span_state = next_span_state
        # a copy: the caller may refill the array it passed in before the next update
        self._span_x = np.array(_time_slice(span_x, b_next - b, e - b, ax)) if extra else None
        return Update(loss, norm, L)

    def _skip(self, loss, norm, steps, state, end):
        if self.max_skipped is not None and self.skipped_in_a_row >= self.max_skipped:
            raise NonFiniteGradientError(
                f"the gradient was not finite (norm {norm}) in {self.max_skipped + 1} updates "
                f"in a row (max_skipped={self.max_skipped}): the parameters or the data hold "
                "NaN or infinity, or the learning rate is too large")
        self.skipped += 1
        self.skipped_in_a_row += 1
        self.position = end
        if not _all_finite(_state_parts(state)):
            state = None
        self.state = self._span_state = state
        self._history_start = self.position
        self._span_x = None
        return Update(loss, norm, steps, True)

    def state_dict(self):
        """The driver's place in the stream, the carried state, the kept inputs, the counts of
        skipped updates and the optimizer's ``state_dict()`` (if it has one); copies."""
        state = {"position": self.position, "history_start": self._history_start,
                 "state": _copy_state(self.state), "span_state": _copy_state(self._span_state),
                 "span_x": None if self._span_x is None else self._span_x.copy(),
                 "skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row}
        if hasattr(self.optimizer, "state_dict"):
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state):
        """Continue from what ``state_dict()`` returned (the model's parameters are restored
        separately, e.g. with ``model.load_state_dict``)."""
        keys = ["position", "history_start", "state", "span_state", "span_x", "skipped",
                "skipped_in_a_row"]
        _check_same_keys("state", state, keys + (["optimizer"] if "optimizer" in state else []))
        counts = {k: _nonnegative_int(f"state[{k!r}]", state[k])
                  for k in ("position", "history_start", "skipped", "skipped_in_a_row")}
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.position, self._history_start = counts["position"], counts["history_start"]
        self.skipped, self.skipped_in_a_row = counts["skipped"], counts["skipped_in_a_row"]
        self.state = _copy_state(state["state"])
        self._span_state = _copy_state(state["span_state"])
        self._span_x = None if state["span_x"] is None else np.array(state["span_x"])

    def run(self, x, target):
        """Walk the whole stream ``x`` (with ``target``) in windows of k1 steps from the carried
        state (``reset()`` first for a fresh stream); returns the list of ``Update``."""
        ax = self.time_axis
        x = np.asarray(x)
        target = np.asarray(target)
        if x.ndim <= ax:
            raise ValueError(f"x: expected a time axis {ax}, got shape {x.shape}")
        T = x.shape[ax]
        return [self.step(_time_slice(x, t, t + self.k1, ax),
                          _time_slice(target, t, t + self.k1, ax))
                for t in range(0, T, self.k1)]
