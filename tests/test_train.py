"""fastrnn.train: Embedding and Linear, the losses, the optimizers, clipping and the truncated-BPTT
driver, checked against central differences, hand-computed values and brute-force computations."""
import math

import numpy as np
import pytest

from fastrnn.train import (Adam, Embedding, Linear, NonFiniteGradientError, SGD, TruncatedBPTT,
                           clip_grad_norm, clip_grad_value, global_norm, mse_loss,
                           softmax_cross_entropy)

from conftest import BACKENDS, CELL_OPTIONS, central_difference

# tolerances per dtype: float64 against central differences (h = 1e-6: truncation ~1e-12,
# rounding ~1e-10), float32 against the float64 result
CENTRAL_TOL = 1e-8
FLOAT32_TOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


def read_only(a):
    a = np.array(a)
    a.setflags(write=False)
    return a


# ---------------------------------------------------------------------------------------------
# Embedding

def test_embedding_forward_is_a_row_lookup():
    emb = Embedding(7, 3, dtype=np.float64, seed=1)
    idx = np.array([[0, 6, 6], [3, 0, 1]])
    y = emb(idx)
    assert y.shape == (2, 3, 3)
    np.testing.assert_array_equal(y, emb.params["weight"][idx])
    np.testing.assert_array_equal(y[0, 1], emb.params["weight"][6])


@pytest.mark.parametrize("shape", [(1,), (5, 3), (2, 1, 4)])
def test_embedding_gradient_central_difference(shape):
    rng = np.random.default_rng(0)
    emb = Embedding(4, 3, dtype=np.float64, seed=2)
    idx = rng.integers(0, 4, size=shape)          # repeats: rows accumulate
    proj = rng.standard_normal(shape + (3,))
    y, cache = emb.forward(idx)
    emb.zero_grad()
    assert emb.backward(proj, cache) is None
    numeric = central_difference(lambda: float(np.sum(emb(idx) * proj)), emb.params["weight"])
    assert rel_err(emb.grads["weight"], numeric) < CENTRAL_TOL
    # rows never looked up get nothing
    unused = np.setdiff1d(np.arange(4), idx)
    assert np.all(emb.grads["weight"][unused] == 0)


def test_embedding_backward_adds_and_float32_matches_float64():
    rng = np.random.default_rng(1)
    e64 = Embedding(5, 2, dtype=np.float64, seed=3)
    e32 = Embedding(5, 2, dtype=np.float32, seed=3)
    idx = rng.integers(0, 5, size=(6, 2))
    dy = rng.standard_normal((6, 2, 2))
    _, c64 = e64.forward(idx)
    _, c32 = e32.forward(idx)
    e64.backward(dy, c64)
    once = e64.grads["weight"].copy()
    e64.backward(dy, c64)
    np.testing.assert_allclose(e64.grads["weight"], 2 * once, rtol=1e-15)
    e32.backward(dy, c32)
    assert e32.grads["weight"].dtype == np.float32
    assert rel_err(e32.grads["weight"], once) < FLOAT32_TOL


def test_embedding_bad_input():
    emb = Embedding(4, 2)
    with pytest.raises(TypeError, match=r"idx: expected an integer array, got dtype float64"):
        emb(np.zeros(3))
    with pytest.raises(ValueError, match=r"idx: expected values in \[0, 4\), got 4"):
        emb(np.array([0, 4]))
    with pytest.raises(ValueError, match=r"idx: expected values in \[0, 4\), got -1"):
        emb(np.array([-1, 2]))
    with pytest.raises(ValueError, match="num_embeddings: expected a positive integer, got 0"):
        Embedding(0, 2)
    with pytest.raises(TypeError, match="dtype: expected float32 or float64, got float16"):
        Embedding(3, 2, dtype=np.float16)
    _, cache = emb.forward(np.array([1, 2]))
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 2\), got \(2, 3\)"):
        emb.backward(np.zeros((2, 3)), cache)


# ---------------------------------------------------------------------------------------------
# Linear

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 3), (4, 1, 3), (2, 5, 3)])
def test_linear_gradients_central_difference(shape, bias):
    rng = np.random.default_rng(4)
    lin = Linear(3, 2, bias=bias, dtype=np.float64, seed=5)
    x = rng.standard_normal(shape)
    proj = rng.standard_normal(shape[:-1] + (2,))
    f = lambda: float(np.sum(lin(x) * proj))   # noqa: E731
    y, cache = lin.forward(x)
    np.testing.assert_allclose(y, x @ lin.params["weight"].T
                               + (lin.params["bias"] if bias else 0), rtol=1e-14)
    lin.zero_grad()
    dx = lin.backward(proj, cache)
    assert set(lin.grads) == ({"weight", "bias"} if bias else {"weight"})
    for name, p in lin.params.items():
        assert rel_err(lin.grads[name], central_difference(f, p)) < CENTRAL_TOL, name
    assert rel_err(dx, central_difference(f, x)) < CENTRAL_TOL


def test_linear_float32_matches_float64_and_leaves_input_alone():
    rng = np.random.default_rng(6)
    l64 = Linear(5, 3, dtype=np.float64, seed=7)
    l32 = Linear(5, 3, dtype=np.float32, seed=7)
    x = read_only(rng.standard_normal((3, 2, 5)))
    dy = read_only(rng.standard_normal((3, 2, 3)))
    x_before = x.copy()
    y64, c64 = l64.forward(x)
    y32, c32 = l32.forward(x)           # float64 input cast once to float32
    assert y32.dtype == np.float32
    assert rel_err(y32, y64) < FLOAT32_TOL
    dx64, dx32 = l64.backward(dy, c64), l32.backward(dy, c32)
    assert dx32.dtype == np.float32 and rel_err(dx32, dx64) < FLOAT32_TOL
    for k in l64.grads:
        assert rel_err(l32.grads[k], l64.grads[k]) < FLOAT32_TOL
    np.testing.assert_array_equal(x, x_before)


def test_linear_bad_input_and_state_dict():
    lin = Linear(3, 2)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 3\), got \(4, 2\)"):
        lin(np.zeros((4, 2)))
    with pytest.raises(TypeError, match="x: expected a floating-point array, got dtype int64"):
        lin(np.zeros((4, 3), dtype=np.int64))
    other = Linear(3, 2, seed=11)
    before = other.params["weight"]
    other.load_state_dict(lin.state_dict())
    assert other.params["weight"] is before           # in place: optimizers keep working
    np.testing.assert_array_equal(other.params["weight"], lin.params["weight"])
    with pytest.raises(ValueError, match=r"state_dict\['weight'\]: expected shape \(2, 3\)"):
        other.load_state_dict({"weight": np.zeros((3, 2)), "bias": np.zeros(2)})
    with pytest.raises(KeyError, match="missing \\['bias'\\]"):
        other.load_state_dict({"weight": np.zeros((2, 3))})


# ---------------------------------------------------------------------------------------------
# losses

def test_softmax_cross_entropy_hand_computed():
    # row 0: p = (1/4, 3/4), target 1 -> -ln(3/4); row 1: p = (1/2, 1/2), target 0 -> ln 2
    logits = np.array([[0.0, math.log(3)], [5.0, 5.0]])
    loss, d = softmax_cross_entropy(logits, np.array([1, 0]))
    assert loss == pytest.approx((-math.log(0.75) + math.log(2)) / 2, rel=1e-15)
    np.testing.assert_allclose(d, np.array([[0.25, -0.25], [-0.5, 0.5]]) / 2, rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_cross_entropy_gradient_with_mask_and_ignore_index(dtype):
    rng = np.random.default_rng(8)
    T, B, C = 3, 4, 5
    logits64 = rng.standard_normal((T, B, C)) * 3
    targets = rng.integers(0, C, size=(T, B))
    mask = rng.random((T, B)) < 0.7
    mask[0, 0] = True
    targets[0, 0] = -100                     # ignored even though the mask counts it
    counted = mask & (targets != -100)
    loss, d = softmax_cross_entropy(logits64.astype(dtype), targets, mask=mask,
                                    ignore_index=-100)
    assert d.dtype == dtype
    # the loss is the plain mean over the counted positions only
    z = logits64[counted]
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    expected = -np.mean(logp[np.arange(len(z)), targets[counted]])
    tol = CENTRAL_TOL if dtype == np.float64 else FLOAT32_TOL
    assert abs(loss - expected) < tol
    assert np.all(d[~counted] == 0)
    numeric = central_difference(
        lambda: softmax_cross_entropy(logits64, targets, mask=mask, ignore_index=-100)[0],
        logits64)
    assert rel_err(d, numeric) < tol


def test_softmax_cross_entropy_is_stable_and_handles_nothing_counted():
    logits = np.array([[1000.0, 1000.0 + math.log(3)]])
    loss, d = softmax_cross_entropy(logits, np.array([0]))
    assert loss == pytest.approx(math.log(4), rel=1e-12)
    np.testing.assert_allclose(d, [[-0.75, 0.75]], rtol=1e-12)
    loss, d = softmax_cross_entropy(logits, np.array([0]), mask=np.array([False]))
    assert loss == 0.0 and np.all(d == 0)


def test_softmax_cross_entropy_bad_input():
    logits = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"targets: expected shape \(2, 3\).*got \(3, 2\)"):
        softmax_cross_entropy(logits, np.zeros((3, 2), dtype=int))
    with pytest.raises(TypeError, match="targets: expected an integer array, got dtype float64"):
        softmax_cross_entropy(logits, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 4\) at counted "
                                         r"positions, got 4"):
        softmax_cross_entropy(logits, np.full((2, 3), 4))
    with pytest.raises(TypeError, match="mask: expected a boolean array, got dtype int64"):
        softmax_cross_entropy(logits, np.zeros((2, 3), dtype=int), mask=np.ones((2, 3), int))
    with pytest.raises(TypeError, match="logits: expected a floating-point array"):
        softmax_cross_entropy(np.zeros((2, 3), dtype=int), np.zeros(2, dtype=int))


def test_mse_hand_computed_gradient_and_mask():
    loss, d = mse_loss(np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([[0.0, 2.0], [1.0, 1.0]]))
    assert loss == pytest.approx((1 + 0 + 4 + 16) / 4, rel=1e-15)
    np.testing.assert_allclose(d, np.array([[2.0, 0.0], [4.0, 8.0]]) / 4, rtol=1e-15)
    rng = np.random.default_rng(9)
    pred, target = rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 3, 2))
    mask = rng.random((4, 3)) < 0.5
    mask[0, 0] = True
    loss, d = mse_loss(pred, target, mask=mask)
    assert loss == pytest.approx(np.mean((pred[mask] - target[mask]) ** 2), rel=1e-14)
    assert np.all(d[~mask] == 0)
    numeric = central_difference(lambda: mse_loss(pred, target, mask=mask)[0], pred)
    assert rel_err(d, numeric) < CENTRAL_TOL
    with pytest.raises(ValueError, match=r"target: expected shape \(4, 3, 2\)"):
        mse_loss(pred, target[:2])
    with pytest.raises(ValueError, match=r"mask: expected a leading part"):
        mse_loss(pred, target, mask=mask.T)


# ---------------------------------------------------------------------------------------------
# optimizers, hand-computed

def test_sgd_plain_momentum_nesterov_weight_decay():
    p = {"w": np.array([1.0, -2.0])}
    opt = SGD(p, lr=0.1)
    opt.step({"w": np.array([0.5, -1.0])})
    np.testing.assert_allclose(p["w"], [0.95, -1.9], rtol=1e-15)

    # momentum 0.9, constant gradient 0.5: buf = 0.5, 0.95, 1.355
    p = {"w": np.array([1.0])}
    opt = SGD(p, lr=0.1, momentum=0.9)
    for expected in (0.95, 0.855, 0.7195):
        opt.step({"w": np.array([0.5])})
        assert p["w"][0] == pytest.approx(expected, rel=1e-14)

    # nesterov: p -= lr * (g + 0.9 * buf); buf = 0.5 then 0.95 -> steps 0.095, 0.1355
    p = {"w": np.array([1.0])}
    opt = SGD(p, lr=0.1, momentum=0.9, nesterov=True)
    opt.step({"w": np.array([0.5])})
    assert p["w"][0] == pytest.approx(1 - 0.095, rel=1e-14)
    opt.step({"w": np.array([0.5])})
    assert p["w"][0] == pytest.approx(1 - 0.095 - 0.1355, rel=1e-14)

    # weight decay 0.1 on p = 2: g = 1 + 0.2
    p = {"w": np.array([2.0])}
    SGD(p, lr=0.5, weight_decay=0.1).step({"w": np.array([1.0])})
    assert p["w"][0] == pytest.approx(2 - 0.5 * 1.2, rel=1e-15)


def test_adam_two_steps_hand_computed():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    p = {"w": np.array([1.0, 0.0])}
    opt = Adam(p, lr=lr, betas=(b1, b2), eps=eps)
    g1 = np.array([2.0, -0.5])
    opt.step({"w": g1})
    # step 1: m_hat = g, v_hat = g^2 -> p -= lr * g / (|g| + eps)
    np.testing.assert_allclose(p["w"], [1 - lr * 2 / (2 + eps), lr * 0.5 / (0.5 + eps)],
                               rtol=1e-14)
    opt.step({"w": np.array([-1.0, -0.5])})
    # component 0: m = 0.9*0.2 - 0.1 = 0.08; v = 0.999*0.004 + 0.001 = 0.004996
    m_hat, v_hat = 0.08 / (1 - b1**2), 0.004996 / (1 - b2**2)
    expected0 = 1 - lr * 2 / (2 + eps) - lr * m_hat / (math.sqrt(v_hat) + eps)
    # component 1: constant gradient -0.5: m_hat = -0.5, v_hat = 0.25 -> another +lr step
    expected1 = 2 * lr * 0.5 / (0.5 + eps)
    np.testing.assert_allclose(p["w"], [expected0, expected1], rtol=1e-13)


def test_adam_float32_params_stay_float32_and_in_place():
    w = np.ones(3, dtype=np.float32)
    opt = Adam({"w": w}, lr=0.01)
    opt.step({"w": np.array([1.0, -1.0, 0.0])})
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [0.99, 1.01, 1.0], rtol=1e-6)


def test_optimizer_bad_arguments():
    p = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="lr: expected a positive finite number, got 0"):
        SGD(p, lr=0)
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\), got 1.5"):
        SGD(p, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match=r"betas\[1\]: expected a number in \[0, 1\), got 1.0"):
        Adam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"params\['w'\]: expected a writeable array"):
        SGD({"w": read_only(np.zeros(2))}, lr=0.1)
    opt = Adam(p)
    with pytest.raises(KeyError, match=r"grads: .*missing \['w'\], unexpected \['v'\]"):
        opt.step({"v": np.zeros(2)})
    with pytest.raises(ValueError, match=r"grads\['w'\]: expected shape \(2,\), got \(3,\)"):
        opt.step({"w": np.zeros(3)})


# ---------------------------------------------------------------------------------------------
# clipping

def test_clip_grad_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert global_norm(grads) == 5.0
    assert clip_grad_norm(grads, 1.0) == 5.0                    # the norm before clipping
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-15)
    np.testing.assert_allclose(grads["b"], [[0.8]], rtol=1e-15)
    assert global_norm(grads) == pytest.approx(1.0, rel=1e-15)
    assert clip_grad_norm(grads, 2.0) == pytest.approx(1.0)     # below the limit: untouched
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-15)
    with pytest.raises(ValueError, match="max_norm: expected a positive finite number, got -1"):
        clip_grad_norm(grads, -1)


def test_clip_grad_value():
    grads = {"a": np.array([3.0, -0.5, -7.0]), "b": np.array([[0.25]], dtype=np.float32)}
    clip_grad_value(grads, 1.0)
    np.testing.assert_array_equal(grads["a"], [1.0, -0.5, -1.0])
    assert grads["b"].dtype == np.float32 and grads["b"][0, 0] == 0.25


# ---------------------------------------------------------------------------------------------
# the truncated-BPTT driver

class NoStep:
    """An optimizer that leaves the parameters alone (to watch the state carried)."""

    def step(self, grads):
        pass


def make(cell, backend, seed=0, **options):
    cls, cell_options = CELL_OPTIONS[cell]
    return cls(2, 3, options.pop("num_layers", 1), dtype=np.float64, backend=backend, seed=seed,
               **cell_options, **options)


def stream(T, B=2, I=2, H=3, seed=10):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, B, I)), rng.standard_normal((T, B, H))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, num_layers", [("lstm", 2), ("gru", 1), ("rnn_tanh", 1)])
def test_driver_k2_equal_k1_is_manual_windows(backend, cell, num_layers):
    x, target = stream(11)                        # windows 4, 4, 3
    m_driver = make(cell, backend, num_layers=num_layers)
    m_manual = make(cell, backend, num_layers=num_layers)
    driver = TruncatedBPTT(m_driver, mse_loss, Adam(m_driver.params, lr=0.05), k1=4,
                           clip_norm=0.1)
    updates = driver.run(x, target)

    opt = Adam(m_manual.params, lr=0.05)
    state, losses = None, []
    for s in range(0, 11, 4):
        y, state, cache = m_manual.forward(x[s:s + 4], state, train=True)
        loss, dy = mse_loss(y, target[s:s + 4])
        m_manual.zero_grad()
        m_manual.backward(dy, cache)
        clip_grad_norm(m_manual.grads, 0.1)
        opt.step(m_manual.grads)
        losses.append(loss)
    assert [u.steps for u in updates] == [4, 4, 3]
    np.testing.assert_allclose([u.loss for u in updates], losses, rtol=1e-12)
    assert updates[0].grad_norm > 0.1                       # the clipping did something
    for k in m_manual.params:
        assert rel_err(m_driver.params[k], m_manual.params[k]) < 1e-12, k
    for a, b in zip(np.atleast_1d(driver.state), np.atleast_1d(state)):
        assert rel_err(a, b) < 1e-12


def brute_force_k1_k2(m, x, target, k1, k2, lr):
    """BPTT(k1, k2) by its definition: for window [s, e), the loss on the window's outputs as a
    function of the parameters, with the model run over [b, e), b = max(0, s - (k2 - k1)), in
    one call from the state at b held fixed; its gradient by central differences; then an SGD
    step. The state at the next b comes from the forward with the parameters before the step."""
    T = x.shape[0]
    state_b = None
    losses = []
    for s in range(0, T, k1):
        e = min(s + k1, T)
        b = max(0, s - (k2 - k1))

        def window_loss():
            y, _ = m(x[b:e], state_b)
            return mse_loss(y[s - b:], target[s:e])[0]

        losses.append(window_loss())
        grads = {k: central_difference(window_loss, p) for k, p in m.params.items()}
        b_next = max(0, e - (k2 - k1))
        if b_next > b:
            _, state_b = m(x[b:b_next], state_b)
        for k, p in m.params.items():
            p -= lr * grads[k]
    return losses


@pytest.mark.parametrize("k1, k2", [(2, 3), (2, 5), (3, 4), (1, 3)])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_driver_k2_greater_than_k1_is_the_brute_force(cell, k1, k2):
    x, target = stream(7)                         # the last window is short for k1 = 2, 3
    m_driver = make(cell, "reference", seed=3)
    m_brute = make(cell, "reference", seed=3)
    driver = TruncatedBPTT(m_driver, mse_loss, SGD(m_driver.params, lr=0.5), k1=k1, k2=k2)
    updates = driver.run(x, target)
    losses = brute_force_k1_k2(m_brute, x, target, k1, k2, lr=0.5)
    np.testing.assert_allclose([u.loss for u in updates], losses, rtol=1e-9)
    moved = 0.0
    for k, p in m_brute.params.items():
        assert rel_err(m_driver.params[k], p) < 1e-8, k
        moved = max(moved, rel_err(p, make(cell, "reference", seed=3).params[k]))
    assert moved > 1e-2                           # the updates did change the parameters


def test_driver_k2_greater_than_k1_differs_from_k2_equal_k1():
    """The extra steps matter: BPTT(2, 4) and BPTT(2, 2) give different updates."""
    x, target = stream(6)
    params = []
    for k2 in (2, 4):
        m = make("lstm", "reference", seed=4)
        TruncatedBPTT(m, mse_loss, SGD(m.params, lr=0.5), k1=2, k2=k2).run(x, target)
        params.append(m.params["weight_hh_l0"].copy())
    assert rel_err(params[0], params[1]) > 1e-4


@pytest.mark.parametrize("k2", [3, 5])
def test_driver_carries_the_state_and_batch_first(k2):
    """With parameters held still the carried state is the state after the whole stream, and a
    batch_first layer walks time along axis 1."""
    x, target = stream(9)
    m = make("lstm", "reference", num_layers=2)
    driver = TruncatedBPTT(m, mse_loss, NoStep(), k1=3, k2=k2)
    driver.run(x, target)
    _, state = m(x)
    for a, b in zip(driver.state, state):
        assert rel_err(a, b) < 1e-13
    mb = make("lstm", "reference", num_layers=2, batch_first=True)
    driver_b = TruncatedBPTT(mb, mse_loss, NoStep(), k1=3, k2=k2)
    updates = driver_b.run(x.transpose(1, 0, 2), target.transpose(1, 0, 2))
    assert [u.steps for u in updates] == [3, 3, 3]
    for a, b in zip(driver_b.state, state):
        assert rel_err(a, b) < 1e-13


def test_driver_bad_arguments_and_inputs_left_alone():
    m = make("gru", "reference")
    with pytest.raises(ValueError, match="k2: expected k2 >= k1 = 4, got 3"):
        TruncatedBPTT(m, mse_loss, NoStep(), k1=4, k2=3)
    with pytest.raises(ValueError, match="k1: expected a positive integer, got 0"):
        TruncatedBPTT(m, mse_loss, NoStep(), k1=0)
    driver = TruncatedBPTT(m, mse_loss, NoStep(), k1=2, k2=3)
    x, target = stream(5)
    with pytest.raises(ValueError, match=r"target: expected 2 time steps along axis 0"):
        driver.step(x[:2], target[:3])
    x, target = read_only(x), read_only(target)
    x_before = x.copy()
    driver.run(x, target)
    np.testing.assert_array_equal(x, x_before)


# ---------------------------------------------------------------------------------------------
# atomic optimizer steps, arguments that help, options not covered above

@pytest.mark.parametrize("make_optimizer", [
    lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: Adam(p, lr=0.1)])
def test_optimizer_checks_every_gradient_before_changing_anything(make_optimizer):
    params = {"a": np.ones(2), "b": np.ones(3)}
    opt = make_optimizer(params)
    before = opt.state_dict()
    for bad, error, message in [
            (np.ones(4), ValueError, r"grads\['b'\]: expected shape \(3,\), got \(4,\)"),
            (np.ones(3, dtype=int), TypeError,
             r"grads\['b'\]: expected a floating-point array, got dtype int64")]:
        with pytest.raises(error, match=message):
            opt.step({"a": np.ones(2), "b": bad})
        np.testing.assert_array_equal(params["a"], 1.0)          # 'a' comes first: untouched
        after = opt.state_dict()
        assert after["steps"] == 0
        for name in set(before) - {"steps"}:
            for k in before[name]:
                np.testing.assert_array_equal(after[name][k], before[name][k])


def test_optimizer_arguments_that_help():
    p = {"w": np.zeros(2)}
    with pytest.raises(TypeError, match=r"lr: expected a positive finite number, got '0.1' "
                                        r"\(str\)"):
        SGD(p, "0.1")
    with pytest.raises(ValueError, match="lr: expected a positive finite number, got inf"):
        Adam(p, lr=math.inf)
    with pytest.raises(ValueError, match=r"betas: expected two numbers in \[0, 1\) \(beta1, "
                                         r"beta2\), got \(0.9, 0.99, 0.999\)"):
        Adam(p, betas=(0.9, 0.99, 0.999))
    with pytest.raises(ValueError, match=r"eps: expected a positive finite number \(0 gives "
                                         r"0/0 = NaN where a gradient has been zero\), got 0"):
        Adam(p, eps=0)
    with pytest.raises(ValueError, match="weight_decay: expected a finite number >= 0, got -1"):
        SGD(p, 0.1, weight_decay=-1)
    grads = {"w": np.ones(2), "v": read_only(np.ones(2))}
    for clip in (lambda g: clip_grad_norm(g, 1.0), lambda g: clip_grad_value(g, 0.5)):
        with pytest.raises(ValueError, match=r"grads\['v'\]: expected a writeable numpy array "
                                             r"\(clipped in place\), got a read-only one"):
            clip(grads)
        np.testing.assert_array_equal(grads["w"], 1.0)
    # NumPy's integer and float scalars wherever Python's are taken
    SGD(p, np.float32(0.1), np.float64(0.5))
    Adam(p, lr=np.float64(0.1), betas=(np.float32(0.5), 0.9), eps=np.float64(1e-8))
    emb, lin = Embedding(np.int64(4), np.int32(2)), Linear(np.int64(3), np.uint8(2))
    assert emb.params["weight"].shape == (4, 2) and lin.params["weight"].shape == (2, 3)
    driver = TruncatedBPTT(make("gru", "reference"), mse_loss, NoStep(), k1=np.int64(2),
                           k2=np.int32(3), max_skipped=np.int64(1))
    assert (driver.k1, driver.k2, driver.max_skipped) == (2, 3, 1)


def test_global_norm_does_not_overflow():
    grads = {"a": np.array([3e200, 0.0]), "b": np.array([[4e200]])}
    assert global_norm(grads) == pytest.approx(5e200, rel=1e-15)
    clip_grad_norm(grads, 1.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-14)


def test_adam_weight_decay_two_steps_hand_computed():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.1
    p = {"w": np.array([2.0])}
    opt = Adam(p, lr=lr, eps=eps, weight_decay=wd)
    expected, m, v = 2.0, 0.0, 0.0
    for t, grad in enumerate((1.0, -1.0), start=1):
        opt.step({"w": np.array([grad])})
        g = grad + wd * expected                          # the L2 term joins the gradient
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
        assert p["w"][0] == pytest.approx(expected, rel=1e-14)
    plain = {"w": np.array([2.0])}
    for grad in (1.0, -1.0):
        Adam(plain, lr=lr, eps=eps).step({"w": np.array([grad])})
    assert abs(plain["w"][0] - p["w"][0]) > 1e-3                  # the decay did something


def test_driver_clip_value_and_reset_state():
    x, target = stream(6)
    m_driver, m_manual = make("lstm", "reference"), make("lstm", "reference")
    rng = np.random.default_rng(1)
    h0 = (rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 2, 3)))
    driver = TruncatedBPTT(m_driver, mse_loss, SGD(m_driver.params, lr=0.5), k1=3,
                           clip_value=0.01)
    driver.reset(h0)
    driver.run(x, target)
    opt, state, clipped = SGD(m_manual.params, lr=0.5), h0, False
    for s in (0, 3):
        y, state, cache = m_manual.forward(x[s:s + 3], state, train=True)
        m_manual.zero_grad()
        m_manual.backward(mse_loss(y, target[s:s + 3])[1], cache)
        clipped |= any(np.abs(g).max() > 0.01 for g in m_manual.grads.values())
        clip_grad_value(m_manual.grads, 0.01)
        opt.step(m_manual.grads)
    assert clipped                                              # the clipping acted
    for k in m_manual.params:
        assert rel_err(m_driver.params[k], m_manual.params[k]) < 1e-13, k
    # reset(state) starts from that state, not zeros
    m = make("lstm", "reference")
    driver = TruncatedBPTT(m, mse_loss, NoStep(), k1=3)
    driver.reset(h0)
    driver.run(x, target)
    for a, b in zip(driver.state, m(x, h0)[1]):
        assert rel_err(a, b) < 1e-13
    assert rel_err(driver.state[0], m(x)[1][0]) > 1e-3


def test_driver_keeps_its_own_copy_of_the_history():
    """BPTT(2, 4) fed windows from one reused buffer gives what fresh arrays give."""
    x, target = stream(8)
    results = []
    for reuse in (False, True):
        m = make("gru", "reference", seed=5)
        driver = TruncatedBPTT(m, mse_loss, SGD(m.params, lr=0.5), k1=2, k2=4)
        buffer = np.empty((2, 2, 2))
        for s in range(0, 8, 2):
            window = x[s:s + 2].copy()
            if reuse:
                buffer[...] = window
                window = buffer
            driver.step(window, target[s:s + 2])
        results.append(m.params)
    for k in results[0]:
        assert rel_err(results[1][k], results[0][k]) < 1e-15, k


def test_driver_skips_non_finite_gradients():
    x, target = stream(12)
    x[4, 0, 0] = np.nan                                         # in the third window
    m = make("lstm", "reference")
    opt = Adam(m.params, lr=0.05)
    driver = TruncatedBPTT(m, mse_loss, opt, k1=2, k2=3, max_skipped=1)
    updates = [driver.step(x[s:s + 2], target[s:s + 2]) for s in (0, 2)]
    before = m.state_dict()
    u = driver.step(x[4:6], target[4:6])
    assert u.skipped and not math.isfinite(u.grad_norm) and driver.skipped == 1
    assert opt.steps == 2 and not any(u.skipped for u in updates)
    for k, v in before.items():
        np.testing.assert_array_equal(m.params[k], v)           # nothing applied
    assert driver.state is None                                 # the NaN state was dropped
    u = driver.step(x[6:8], target[6:8])                        # from the zero state
    assert not u.skipped and opt.steps == 3
    assert all(np.isfinite(v).all() for v in m.params.values())
    # max_skipped=1: the second non-finite update in a row raises
    x[8, 0, 0] = x[10, 0, 0] = np.nan
    assert driver.step(x[8:10], target[8:10]).skipped
    with pytest.raises(NonFiniteGradientError, match=r"the gradient was not finite \(norm nan\) "
                                                     r"in 2 updates in a row \(max_skipped=1\)"):
        driver.step(x[10:12], target[10:12])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_driver_state_dict_continues_exactly(optimizer):
    """3 windows, then the model, the driver and the optimizer restored into new objects for 3
    more, equal 6 windows in one go (BPTT(2, 3): the history and the state at its start)."""
    x, target = stream(12)

    def build():
        m = make("lstm", "reference", seed=6, num_layers=2)
        opt = (Adam(m.params, lr=0.05) if optimizer == "adam"
               else SGD(m.params, lr=0.1, momentum=0.9))
        return m, TruncatedBPTT(m, mse_loss, opt, k1=2, k2=3, clip_norm=1.0)

    m_once, d_once = build()
    d_once.run(x, target)
    m_first, d_first = build()
    d_first.run(x[:6], target[:6])
    saved_params, saved_driver = m_first.state_dict(), d_first.state_dict()
    d_first.run(x[6:], target[6:])                              # changes nothing saved
    m_second, d_second = build()
    m_second.load_state_dict(saved_params)
    d_second.load_state_dict(saved_driver)
    d_second.run(x[6:], target[6:])
    for k in m_once.params:
        assert rel_err(m_second.params[k], m_once.params[k]) < 1e-12, k
    fresh, _ = build()
    assert max(rel_err(fresh.params[k], m_once.params[k]) for k in fresh.params) > 1e-3
    with pytest.raises(KeyError, match=r"state: expected the keys"):
        d_second.load_state_dict({"position": 0})
