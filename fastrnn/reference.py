"""The NumPy reference: slow, plain and meant to be obviously right. Every test compares to it.

Notation (one time step, B rows of the batch, H hidden units):

    x_proj   W_ih x + b_ih for this step, (B, G*H): the input side of every gate
    h, c     the state before the step, (B, H); h_new, c_new after it
    a_*      a gate's pre-activation; i, f, g, o, r, z, n the activated gates
    d*       the gradient of the loss with respect to *

Each cell is a pair ``*_step_forward`` / ``*_step_backward``, both given the cell record and ``p``,
the layer's parameters by name (``cell.param_names``). A forward step returns the new state and
what its backward needs (``saved``, a dict: it holds, under their names, the buffers the record
says the compiled kernels keep, ``cell.saved``); a backward step takes the gradient of the new
state, ADDS the gradients of the hidden-side parameters (``w_hh``, ``b_hh``, the cell's extra
ones) into ``grads`` and returns the gradient of ``x_proj`` and of the old state. ``layer_forward`` / ``layer_backward`` run a step pair over
time with the contract of ``fastrnn.cells`` (lengths, reverse, truncation), exactly like the
compiled backends, so the same tests drive all of them.
"""
import numpy as np
from scipy.special import expit as sigmoid



# ---------------------------------------------------------------------------------------------
# ONNX's activations (fastrnn.cells.ACTIVATIONS) and their slopes, of the clipped pre-activation

def _activate(act, a):
    name, alpha, beta = act
    if name == "relu":
        return np.maximum(a, 0)                              # maximum keeps NaN
    if name == "tanh":
        return np.tanh(a)
    if name == "sigmoid":
        return sigmoid(a)
    if name == "affine":
        return alpha * a + beta
    if name == "leakyrelu":
        return np.where(a < 0, alpha * a, a)
    if name == "thresholdedrelu":
        return np.where(a > alpha, a, np.where(np.isnan(a), a, 0))
    if name == "scaledtanh":
        return alpha * np.tanh(beta * a)
    if name == "hardsigmoid":
        return np.minimum(np.maximum(alpha * a + beta, 0), 1)
    if name == "elu":
        return np.where(a < 0, alpha * np.expm1(np.minimum(a, 0)), a)
    if name == "softsign":
        return a / (1 + np.abs(a))
    if name == "softplus":
        return np.maximum(a, 0) + np.log1p(np.exp(-np.abs(a)))
    raise ValueError(f"activation {name!r}: not one of fastrnn.cells.ACTIVATIONS")


def _slope(act, a):
    """d act(a) / da; NaN where a is NaN."""
    name, alpha, beta = act
    if name == "relu":
        s = np.where(a > 0, 1.0, 0.0)
    elif name == "tanh":
        s = 1 - np.tanh(a) ** 2
    elif name == "sigmoid":
        s = sigmoid(a) * (1 - sigmoid(a))
    elif name == "affine":
        s = np.full_like(a, alpha)
    elif name == "leakyrelu":
        s = np.where(a < 0, alpha, 1.0)
    elif name == "thresholdedrelu":
        s = np.where(a > alpha, 1.0, 0.0)
    elif name == "scaledtanh":
        s = alpha * beta * (1 - np.tanh(beta * a) ** 2)
    elif name == "hardsigmoid":
        u = alpha * a + beta
        s = np.where((u > 0) & (u < 1), alpha, 0.0)
    elif name == "elu":
        s = np.where(a < 0, alpha * np.exp(np.minimum(a, 0)), 1.0)
    elif name == "softsign":
        s = 1 / (1 + np.abs(a)) ** 2
    elif name == "softplus":
        s = sigmoid(a)
    else:
        raise ValueError(f"activation {name!r}: not one of fastrnn.cells.ACTIVATIONS")
    return np.where(np.isnan(a), a, s).astype(a.dtype, copy=False)


def _clipped(cell, a):
    """ONNX's clip of a gate pre-activation (cell.clip None: none) and the clip's slope (1
    inside [-clip, clip] and for NaN, 0 outside); NaN stays NaN."""
    if cell.clip is None:
        return a, 1
    c = cell.clip
    inside = ~((a < -c) | (a > c))
    return np.where(a > c, c, np.where(a < -c, -c, a)).astype(a.dtype, copy=False), inside


def _gate(cell, slot, a):
    """act_slot(clip(a)) and what its backward needs, (clipped a, clip slope)."""
    a_c, inside = _clipped(cell, a)
    return _activate(cell.activations[slot], a_c), (a_c, inside)


def _gate_slope(cell, slot, kept):
    a_c, inside = kept
    return _slope(cell.activations[slot], a_c) * inside



def _blocks(a, count, H):
    """The gate blocks of pre-activations a (B, count*H); a record whose gate count is not the
    step's is refused here rather than split wrongly."""
    if a.shape[1] != count * H:
        raise ValueError(f"gate pre-activations: the step has {count} gate blocks of {H} units, "
                         f"got width {a.shape[1]}: the cell record's gate count is wrong")
    return np.split(a, count, axis=1)


# ---------------------------------------------------------------------------------------------
# The recurrent products, with recurrent dropout: p["mask"] (G, rows, H), one mask per gate
# block (Keras's), the step's rows, or absent. Block g's product is of h * mask[g].

def _hidden(h, p, g0, g1, H=None, bias=True):
    """h @ w_hh[blocks g0..g1-1].T + b_hh there (bias=False: without it), each block of
    h * mask[g] when masked; H the width of a gate block when it is not h's (a projected
    LSTM)."""
    w, b, mask = p["w_hh"], p["b_hh"], p.get("mask")
    H = h.shape[1] if H is None else H
    if mask is None:
        product = h @ w[g0 * H:g1 * H].T
    else:
        product = np.concatenate([(h * mask[g]) @ w[g * H:(g + 1) * H].T
                                  for g in range(g0, g1)], axis=1)
    return product + b[g0 * H:g1 * H] if bias else product


def _hidden_backward(d, h, p, grads, g0, g1, H=None, bias=True):
    """Backward of _hidden for d = dL/d(its result): ADDS into grads' w_hh (and b_hh unless
    bias=False); returns dL/dh."""
    w, mask = p["w_hh"], p.get("mask")
    H = h.shape[1] if H is None else H
    if bias:
        grads["b_hh"][g0 * H:g1 * H] += d.sum(axis=0)
    if mask is None:
        grads["w_hh"][g0 * H:g1 * H] += d.T @ h
        return d @ w[g0 * H:g1 * H]
    dh = np.zeros_like(h)
    for g in range(g0, g1):
        d_g = d[:, (g - g0) * H:(g - g0 + 1) * H]
        grads["w_hh"][g * H:(g + 1) * H] += d_g.T @ (h * mask[g])
        dh += (d_g @ w[g * H:(g + 1) * H]) * mask[g]
    return dh


# ---------------------------------------------------------------------------------------------
# RNN:  h_new = act(W_ih x + b_ih + W_hh h + b_hh)

def rnn_step_forward(cell, x_proj, state, p):
    (h,) = state
    _blocks(x_proj, 1, h.shape[1])
    (a,) = _blocks(x_proj + _hidden(h, p, 0, 1), 1, h.shape[1])
    h_new, kept = _gate(cell, 0, a)
    return (h_new,), {"h": h, "h_new": h_new, "a": kept}


def rnn_step_backward(cell, d_state_new, saved, p, grads):
    (dh_new,) = d_state_new
    h = saved["h"]
    # relu: the slope is 1 where h_new > 0, else 0, and NaN where a is NaN, which must reach
    # the gradients too
    da = dh_new * _gate_slope(cell, 0, saved["a"])
    dh = _hidden_backward(da, h, p, grads, 0, 1)
    return da, (dh,)


# ---------------------------------------------------------------------------------------------
# LSTM (gate order i, f, g, o; peepholes p_i, p_f see the old cell, p_o the new one)

def lstm_step_forward(cell, x_proj, state, p):
    h, c = state
    H = c.shape[1]                                            # h is P wide when projected
    _blocks(x_proj, 4, H)
    peephole = p.get("peephole")
    a_i, a_f, a_g, a_o = _blocks(x_proj + _hidden(h, p, 0, 4, H), 4, H)
    if peephole is not None:
        p_i, p_f, p_o = peephole
        a_i = a_i + p_i * c
        a_f = a_f + p_f * c
    i, kept_i = _gate(cell, 0, a_i)
    if cell.input_forget:                                     # ONNX's coupled gates
        f, kept_f = 1 - i, None
    else:
        f, kept_f = _gate(cell, 0, a_f)
    g, kept_g = _gate(cell, 1, a_g)
    c_new = f * c + i * g
    if peephole is not None:
        a_o = a_o + p_o * c_new
    o, kept_o = _gate(cell, 0, a_o)
    m = o * _activate(cell.activations[2], c_new)             # ONNX clips gates, not c_new
    h_new = m @ p["w_hr"].T if "w_hr" in p else m             # PyTorch's proj_size
    return (h_new, c_new), {"h": h, "c": c, "i": i, "f": f, "g": g, "o": o, "c_new": c_new,
                            "m": m, "a": (kept_i, kept_f, kept_g, kept_o)}


def lstm_step_backward(cell, d_state_new, saved, p, grads):
    dh_new, dc_new = d_state_new
    h, c, i, f, g, o, c_new = (saved[k] for k in ("h", "c", "i", "f", "g", "o", "c_new"))
    peephole = p.get("peephole")
    kept_i, kept_f, kept_g, kept_o = saved["a"]
    h_act = cell.activations[2]
    if "w_hr" in p:
        # h_new = w_hr m
        grads["w_hr"] += dh_new.T @ saved["m"]
        dm = dh_new @ p["w_hr"]
    else:
        dm = dh_new
    # m = o * h_act(c_new)
    do = dm * _activate(h_act, c_new)
    dc = dc_new + dm * o * _slope(h_act, c_new)
    da_o = do * _gate_slope(cell, 0, kept_o)
    if peephole is not None:
        # a_o = ... + p_o * c_new
        dc = dc + da_o * peephole[2]
    # c_new = f * c + i * g
    di = dc * g
    df = dc * c
    dg = dc * i
    dc_prev = dc * f
    if cell.input_forget:
        # f = 1 - i: the f block's pre-activation is not used
        di = di - df
        da_f = np.zeros_like(df)
    else:
        da_f = df * _gate_slope(cell, 0, kept_f)
    da_i = di * _gate_slope(cell, 0, kept_i)
    da_g = dg * _gate_slope(cell, 1, kept_g)
    if peephole is not None:
        # a_i = ... + p_i * c;  a_f = ... + p_f * c
        dc_prev = dc_prev + da_i * peephole[0] + da_f * peephole[1]
        grads["peephole"][0] += (da_i * c).sum(axis=0)
        grads["peephole"][1] += (da_f * c).sum(axis=0)
        grads["peephole"][2] += (da_o * c_new).sum(axis=0)
    da = np.concatenate([da_i, da_f, da_g, da_o], axis=1)
    dh_prev = _hidden_backward(da, h, p, grads, 0, 4, c.shape[1])
    return da, (dh_prev, dc_prev)


# ---------------------------------------------------------------------------------------------
# GRU, reset after the recurrent matmul (PyTorch):  n = tanh(W_in x + b_in + r * (W_hn h + b_hn))

def gru_step_forward(cell, x_proj, state, p):
    (h,) = state
    H = h.shape[1]
    x_r, x_z, x_n = _blocks(x_proj, 3, H)
    h_r, h_z, hn = _blocks(_hidden(h, p, 0, 3), 3, H)
    r, kept_r = _gate(cell, 0, x_r + h_r)
    z, kept_z = _gate(cell, 0, x_z + h_z)
    n, kept_n = _gate(cell, 1, x_n + r * hn)
    h_new = (1 - z) * n + z * h
    return (h_new,), {"h": h, "r": r, "z": z, "n": n, "hn": hn, "a": (kept_r, kept_z, kept_n)}


def gru_step_backward(cell, d_state_new, saved, p, grads):
    (dh_new,) = d_state_new
    h, r, z, n, hn = (saved[k] for k in ("h", "r", "z", "n", "hn"))
    kept_r, kept_z, kept_n = saved["a"]
    # h_new = (1 - z) * n + z * h
    dn = dh_new * (1 - z)
    dz = dh_new * (h - n)
    dh_prev = dh_new * z
    # n = g(x_n + r * hn)
    da_n = dn * _gate_slope(cell, 1, kept_n)
    dr = da_n * hn
    dhn = da_n * r
    da_r = dr * _gate_slope(cell, 0, kept_r)
    da_z = dz * _gate_slope(cell, 0, kept_z)
    d_hidden = np.concatenate([da_r, da_z, dhn], axis=1)  # gradient of W_hh h + b_hh
    dh_prev = dh_prev + _hidden_backward(d_hidden, h, p, grads, 0, 3)
    return np.concatenate([da_r, da_z, da_n], axis=1), (dh_prev,)


# ---------------------------------------------------------------------------------------------
# GRU, reset before the recurrent matmul (original GRU, ONNX default):
#     n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)

def gru_reset_before_step_forward(cell, x_proj, state, p):
    (h,) = state
    H = h.shape[1]
    w_hh, b_hh = p["w_hh"], p["b_hh"]
    x_r, x_z, x_n = _blocks(x_proj, 3, H)
    h_r, h_z = _blocks(_hidden(h, p, 0, 2), 2, H)
    r, kept_r = _gate(cell, 0, x_r + h_r)
    z, kept_z = _gate(cell, 0, x_z + h_z)
    mask = p.get("mask")
    rh = r * (h if mask is None else h * mask[2])       # Keras: r * (h * the n block's mask)
    n, kept_n = _gate(cell, 1, x_n + rh @ w_hh[2 * H:].T + b_hh[2 * H:])
    h_new = (1 - z) * n + z * h
    return (h_new,), {"h": h, "r": r, "z": z, "n": n, "rh": rh, "a": (kept_r, kept_z, kept_n)}


def gru_reset_before_step_backward(cell, d_state_new, saved, p, grads):
    (dh_new,) = d_state_new
    h, r, z, n, rh = (saved[k] for k in ("h", "r", "z", "n", "rh"))
    kept_r, kept_z, kept_n = saved["a"]
    w_hh = p["w_hh"]
    H = h.shape[1]
    # h_new = (1 - z) * n + z * h
    dn = dh_new * (1 - z)
    dz = dh_new * (h - n)
    dh_prev = dh_new * z
    # n = g(x_n + W_hn rh + b_hn)
    da_n = dn * _gate_slope(cell, 1, kept_n)
    grads["w_hh"][2 * H:] += da_n.T @ rh
    grads["b_hh"][2 * H:] += da_n.sum(axis=0)
    drh = da_n @ w_hh[2 * H:]
    # rh = r * h (h * mask[2] with recurrent dropout)
    mask = p.get("mask")
    h_n = h if mask is None else h * mask[2]
    dr = drh * h_n
    dh_prev = dh_prev + drh * (r if mask is None else r * mask[2])
    da_r = dr * _gate_slope(cell, 0, kept_r)
    da_z = dz * _gate_slope(cell, 0, kept_z)
    da_rz = np.concatenate([da_r, da_z], axis=1)
    dh_prev = dh_prev + _hidden_backward(da_rz, h, p, grads, 0, 2)
    return np.concatenate([da_rz, da_n], axis=1), (dh_prev,)


# ---------------------------------------------------------------------------------------------
# Layer normalization (fastrnn.cells.LAYER_NORM_CODES): LN(v) = (v - mean) / sqrt(var + eps)
# * weight + bias over each row of v. The step pairs of the layer-normalized cells get x_proj
# WITHOUT b_ih (layer_forward leaves it to them: it is added after the normalization) and
# return the gradient of that product; they add b_ih's gradient themselves.

def _layer_norm(v, weight, bias, eps):
    """LN of each row of v, and what its backward needs (the normalized rows, 1 / std)."""
    centered = v - v.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt((centered * centered).mean(axis=1, keepdims=True) + eps)
    v_hat = centered * rstd
    return v_hat * weight + bias, (v_hat, rstd)


def _layer_norm_backward(d, kept, weight, grads, name, start=0, stop=None):
    """Backward of _layer_norm for d = dL/d(its result): ADDS into grads' ln_<name>_weight and
    _bias (entries [start, stop) of them); returns dL/dv."""
    v_hat, rstd = kept
    grads[f"ln_{name}_weight"][start:stop] += (d * v_hat).sum(axis=0)
    grads[f"ln_{name}_bias"][start:stop] += d.sum(axis=0)
    dv_hat = d * weight
    return rstd * (dv_hat - dv_hat.mean(axis=1, keepdims=True)
                   - v_hat * (dv_hat * v_hat).mean(axis=1, keepdims=True))


# LSTM:  a = LN(W_ih x) + LN(W_hh h) + b_ih + b_hh;  c_new = f c + i g;
#        h_new = o tanh(LN(c_new))  (then w_hr's projection, when the cell has one)

def lstm_layer_norm_step_forward(cell, ax, state, p):
    h, c = state
    H = c.shape[1]
    eps = cell.layer_norm_eps
    _blocks(ax, 4, H)
    ah = _hidden(h, p, 0, 4, H, bias=False)
    nx, kept_x = _layer_norm(ax, p["ln_ih_weight"], p["ln_ih_bias"], eps)
    nh, kept_h = _layer_norm(ah, p["ln_hh_weight"], p["ln_hh_bias"], eps)
    a_i, a_f, a_g, a_o = _blocks(nx + nh + p["b_ih"] + p["b_hh"], 4, H)
    i, f, g, o = sigmoid(a_i), sigmoid(a_f), np.tanh(a_g), sigmoid(a_o)
    c_new = f * c + i * g
    nc, kept_c = _layer_norm(c_new, p["ln_cell_weight"], p["ln_cell_bias"], eps)
    tanh_nc = np.tanh(nc)
    m = o * tanh_nc
    h_new = m @ p["w_hr"].T if "w_hr" in p else m
    return (h_new, c_new), {"h": h, "c": c, "i": i, "f": f, "g": g, "o": o, "c_new": c_new,
                            "m": m, "tanh_nc": tanh_nc, "ax": ax, "ah": ah,
                            "ln": (kept_x, kept_h, kept_c)}


def lstm_layer_norm_step_backward(cell, d_state_new, saved, p, grads):
    dh_new, dc_new = d_state_new
    h, c, i, f, g, o, tanh_nc = (saved[k] for k in ("h", "c", "i", "f", "g", "o", "tanh_nc"))
    kept_x, kept_h, kept_c = saved["ln"]
    if "w_hr" in p:
        grads["w_hr"] += dh_new.T @ saved["m"]
        dm = dh_new @ p["w_hr"]
    else:
        dm = dh_new
    # m = o * tanh(LN(c_new))
    do = dm * tanh_nc
    dc = dc_new + _layer_norm_backward(dm * o * (1 - tanh_nc ** 2), kept_c,
                                       p["ln_cell_weight"], grads, "cell")
    # c_new = f * c + i * g
    da = np.concatenate([dc * g * i * (1 - i), dc * c * f * (1 - f), dc * i * (1 - g ** 2),
                         do * o * (1 - o)], axis=1)
    dc_prev = dc * f
    # a = LN(ax) + LN(ah) + b_ih + b_hh
    grads["b_ih"] += da.sum(axis=0)
    grads["b_hh"] += da.sum(axis=0)
    dax = _layer_norm_backward(da, kept_x, p["ln_ih_weight"], grads, "ih")
    dah = _layer_norm_backward(da, kept_h, p["ln_hh_weight"], grads, "hh")
    dh_prev = _hidden_backward(dah, h, p, grads, 0, 4, c.shape[1], bias=False)
    return dax, (dh_prev, dc_prev)


# GRU, reset after:  nx = LN(W_ih x) + b_ih, nh = LN(W_hh h) + b_hh (each over 3H);
#     r = sigmoid(nx_r + nh_r), z = sigmoid(nx_z + nh_z), n = tanh(nx_n + r * nh_n)
# GRU, reset before: nh_rz = LN(W_hrz h) + b_hrz (over 2H), nh_n = LN(W_hn (r * h)) + b_hn
#     (over H), n = tanh(nx_n + nh_n); ln_hh's first 2H entries serve the first, the rest the
#     second.  Both: h_new = (1 - z) * n + z * h

def gru_layer_norm_step_forward(cell, ax, state, p):
    (h,) = state
    H = h.shape[1]
    eps = cell.layer_norm_eps
    ln_w, ln_b, b_hh = p["ln_hh_weight"], p["ln_hh_bias"], p["b_hh"]
    _blocks(ax, 3, H)
    nx, kept_x = _layer_norm(ax, p["ln_ih_weight"], p["ln_ih_bias"], eps)
    x_r, x_z, x_n = _blocks(nx + p["b_ih"], 3, H)
    reset_after = cell.phases == 1
    ah = _hidden(h, p, 0, 3 if reset_after else 2, bias=False)
    nh, kept_h = _layer_norm(ah, ln_w[:ah.shape[1]], ln_b[:ah.shape[1]], eps)
    nh = nh + b_hh[:ah.shape[1]]
    r = sigmoid(x_r + nh[:, :H])
    z = sigmoid(x_z + nh[:, H:2 * H])
    saved = {"h": h, "r": r, "z": z, "ax": ax, "ln": [kept_x, kept_h]}
    if reset_after:
        hn = nh[:, 2 * H:]
        n = np.tanh(x_n + r * hn)
        saved.update(hn=hn, ah=ah)
    else:
        mask = p.get("mask")
        rh = r * (h if mask is None else h * mask[2])
        ah_n = rh @ p["w_hh"][2 * H:].T
        nh_n, kept_n = _layer_norm(ah_n, ln_w[2 * H:], ln_b[2 * H:], eps)
        n = np.tanh(x_n + nh_n + b_hh[2 * H:])
        saved.update(rh=rh, ah=np.concatenate([ah, ah_n], axis=1))
        saved["ln"].append(kept_n)
    h_new = (1 - z) * n + z * h
    saved["n"] = n
    return (h_new,), saved


def gru_layer_norm_step_backward(cell, d_state_new, saved, p, grads):
    (dh_new,) = d_state_new
    h, r, z, n = (saved[k] for k in ("h", "r", "z", "n"))
    H = h.shape[1]
    ln_w = p["ln_hh_weight"]
    # h_new = (1 - z) * n + z * h
    dh_prev = dh_new * z
    da_n = dh_new * (1 - z) * (1 - n ** 2)
    da_z = dh_new * (h - n) * z * (1 - z)
    if cell.phases == 1:
        # n = tanh(nx_n + r * nh_n)
        da_r = da_n * saved["hn"] * r * (1 - r)
        dnh = np.concatenate([da_r, da_z, da_n * r], axis=1)
    else:
        # n = tanh(nx_n + LN(W_hn rh) + b_hn), rh = r * h (h * mask[2] with recurrent dropout)
        grads["b_hh"][2 * H:] += da_n.sum(axis=0)
        dah_n = _layer_norm_backward(da_n, saved["ln"][2], ln_w[2 * H:], grads, "hh", 2 * H)
        grads["w_hh"][2 * H:] += dah_n.T @ saved["rh"]
        drh = dah_n @ p["w_hh"][2 * H:]
        mask = p.get("mask")
        dh_prev = dh_prev + drh * (r if mask is None else r * mask[2])
        da_r = drh * (h if mask is None else h * mask[2]) * r * (1 - r)
        dnh = np.concatenate([da_r, da_z], axis=1)
    width = dnh.shape[1]
    grads["b_hh"][:width] += dnh.sum(axis=0)
    dah = _layer_norm_backward(dnh, saved["ln"][1], ln_w[:width], grads, "hh", 0, width)
    dh_prev = dh_prev + _hidden_backward(dah, h, p, grads, 0, width // H, bias=False)
    da = np.concatenate([da_r, da_z, da_n], axis=1)
    grads["b_ih"] += da.sum(axis=0)
    dax = _layer_norm_backward(da, saved["ln"][0], p["ln_ih_weight"], grads, "ih")
    return dax, (dh_prev,)


# the step pair of each cell: the one place the reference chooses by cell
STEPS = {
    "rnn_tanh": (rnn_step_forward, rnn_step_backward),
    "rnn_relu": (rnn_step_forward, rnn_step_backward),
    "lstm": (lstm_step_forward, lstm_step_backward),
    "lstm_peephole": (lstm_step_forward, lstm_step_backward),
    "gru": (gru_step_forward, gru_step_backward),
    "gru_reset_before": (gru_reset_before_step_forward, gru_reset_before_step_backward),
}
LAYER_NORM_STEPS = {
    "LSTM": (lstm_layer_norm_step_forward, lstm_layer_norm_step_backward),
    "GRU": (gru_layer_norm_step_forward, gru_layer_norm_step_backward),
}


def _step_pair(cell):
    return LAYER_NORM_STEPS[cell.mode] if cell.layer_norm else STEPS[cell.name]


# ---------------------------------------------------------------------------------------------
# One layer, one direction, over time (the contract in fastrnn.cells)

class Cache:
    """What layer_forward keeps for backward: the call's arguments and each step's saved."""

    def __init__(self, cell, x, state0, p, lengths, reverse, steps):
        self.cell, self.x, self.state0, self.p = cell, x, state0, p
        self.lengths, self.reverse, self.steps = lengths, reverse, steps


def _time_order(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _zoneout_keeps(zoneout, t, rows):
    """Step t's keep weights of each state for ``rows``: a rate as it is, masks' rows."""
    return tuple(z if np.isscalar(z) else z[t, rows] for z in zoneout)


def layer_forward(cell, x, state0, params, lengths, reverse, train, y, state_n, threads=None,
                  recurrent_mask=None, zoneout=None):
    # threads: accepted for the contract; the reference runs on the calling thread
    step_forward, _ = _step_pair(cell)
    p = dict(zip(cell.param_names, params))
    if not train:
        recurrent_mask = None                                 # masks act in training only
    T = x.shape[0]
    x_proj = x @ p["w_ih"].T                                  # (T, B, G*H)
    if not cell.layer_norm:
        x_proj += p["b_ih"]
    state = tuple(s.copy() for s in state0)
    steps = []                                                # (t, rows, saved) in time order
    for t in _time_order(T, reverse):
        rows = np.flatnonzero(t < lengths)                    # rows still inside their sequence
        y[t] = 0
        if rows.size == 0:
            continue
        # recurrent dropout: the step's rows of the masks, kept for its backward
        p_t = p if recurrent_mask is None else dict(p, mask=recurrent_mask[:, rows])
        old = tuple(s[rows] for s in state)
        new, saved = step_forward(cell, x_proj[t, rows], old, p_t)
        saved["p"] = p_t
        if zoneout is not None:
            # each unit keeps its value before the step with weight k: s = k s_old + (1-k) s_new
            saved["keeps"] = keeps = _zoneout_keeps(zoneout, t, rows)
            new = tuple(k * s_old + (1 - k) * s_new for k, s_old, s_new in zip(keeps, old, new))
        for s, s_new in zip(state, new):
            s[rows] = s_new                                   # padded rows keep their state
        y[t, rows] = new[0]
        if train:
            steps.append((t, rows, saved))
    for s_n, s in zip(state_n, state):
        s_n[...] = s
    return Cache(cell, x, state0, p, lengths, reverse, steps) if train else None


def layer_backward(cell, cache, dy, dstate_n, truncate, dx, dstate0, dparams, threads=None):
    _, step_backward = _step_pair(cell)
    x, p, reverse = cache.x, cache.p, cache.reverse
    T = x.shape[0]
    grads = dict(zip(cell.param_names, dparams))
    d_state = [np.zeros_like(s) if d is None else np.array(d, copy=True)
               for s, d in zip(cache.state0, dstate_n)]
    saved_at = {t: (rows, saved) for t, rows, saved in cache.steps}
    for t in reversed(_time_order(T, reverse)):
        if t in saved_at:
            rows, saved = saved_at[t]
            d_new = [d[rows] for d in d_state]
            if dy is not None:
                d_new[0] = d_new[0] + dy[t, rows]
            keeps = saved.get("keeps", (0,) * len(d_new))      # zoneout's (0: none)
            dx_proj, d_old = step_backward(cell, tuple((1 - k) * d for k, d in zip(keeps, d_new)),
                                           saved, saved["p"], grads)
            for d, d_o, k, d_n in zip(d_state, d_old, keeps, d_new):
                d[rows] = d_o + k * d_n
            # x_proj = W_ih x + b_ih (layer-normalized cells: b_ih is the step's)
            grads["w_ih"] += dx_proj.T @ x[t, rows]
            if not cell.layer_norm:
                grads["b_ih"] += dx_proj.sum(axis=0)
            dx[t, rows] += dx_proj @ p["w_ih"]
        # the state gradient leaving step t crosses the boundary to the step before it in time
        # order (t - 1 forward, t + 1 reverse); truncation cuts boundaries at multiples of k
        boundary = t + 1 if reverse else t
        if truncate is not None and 0 < boundary < T and boundary % truncate == 0:
            for d in d_state:
                d[...] = 0
    for d0, d in zip(dstate0, d_state):
        d0 += d
