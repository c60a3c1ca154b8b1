"""PyTorch as an outside oracle (skipped when torch is not installed): outputs, final states and
every gradient of nn.LSTM, nn.GRU and nn.RNN with the same weights, loaded by state_dict."""
import numpy as np
import pytest

import fastrnn
from conftest import TOLERANCE, max_rel_error, result_dict, state_parts

torch = pytest.importorskip("torch")

MODELS = {
    "lstm": (fastrnn.LSTM, torch.nn.LSTM, {}),
    "gru": (fastrnn.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (fastrnn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (fastrnn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def _torch_run(module, x, state, lengths, batch_first, dy, dstate, dtype):
    t = lambda a: torch.tensor(np.asarray(a), dtype=TORCH_DTYPE[dtype], requires_grad=True)
    xt = t(x)
    state_t = tuple(t(s) for s in state_parts(state))
    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
        y_packed, final = module(packed, state_t if len(state_t) == 2 else state_t[0])
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y_packed, batch_first=batch_first,
                                                      total_length=x.shape[1 if batch_first
                                                                           else 0])
    else:
        y, final = module(xt, state_t if len(state_t) == 2 else state_t[0])
    final = final if isinstance(final, tuple) else (final,)
    loss = (y * torch.tensor(dy, dtype=y.dtype)).sum()
    for f, d in zip(final, state_parts(dstate)):
        loss = loss + (f * torch.tensor(d, dtype=f.dtype)).sum()
    loss.backward()
    result = {"y": y.detach().numpy(), "dx": xt.grad.numpy()}
    for i, f in enumerate(final):
        result[f"state_n[{i}]"] = f.detach().numpy()
    for i, s in enumerate(state_t):
        result[f"dstate0[{i}]"] = s.grad.numpy()
    for name, p in module.named_parameters():
        result["grad " + name] = p.grad.numpy()
    return result


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["time-major", "batch-first", "packed"])
@pytest.mark.parametrize("stack", [(1, False), (2, True), (3, False)],
                         ids=["L1", "L2bi", "L3"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_matches_pytorch(backend, model, stack, layout, dtype):
    ours_cls, torch_cls, options = MODELS[model]
    num_layers, bidirectional = stack
    batch_first = layout == "batch-first"
    T, B, I, H = 6, 4, 5, 7
    rng = np.random.default_rng(num_layers * 10 + len(layout))
    ours = ours_cls(I, H, num_layers, bidirectional=bidirectional, batch_first=batch_first,
                    dtype=dtype, backend=backend, seed=1, **options)
    theirs = torch_cls(I, H, num_layers, bidirectional=bidirectional, batch_first=batch_first,
                       **options).to(TORCH_DTYPE[dtype])
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    D = 2 if bidirectional else 1
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    dy = rng.standard_normal(x.shape[:2] + (D * H,)).astype(dtype)
    parts = [rng.standard_normal((num_layers * D, B, H)).astype(dtype)
             for _ in ours.cell.state_names]
    state = tuple(parts) if len(parts) == 2 else parts[0]
    dparts = [rng.standard_normal((num_layers * D, B, H)).astype(dtype) for _ in parts]
    dstate = tuple(dparts) if len(dparts) == 2 else dparts[0]
    lengths = np.array([6, 2, 5, 1]) if layout == "packed" else None

    expected = _torch_run(theirs, x, state, lengths, batch_first, dy, dstate, dtype)
    y, final, cache = ours.forward(x, state, lengths, train=True)
    dx, dstate0 = ours.backward(dy, cache, dstate)
    got = result_dict(y, dx, final, dstate0, ours.grads)
    assert got.keys() == expected.keys()
    tol = TOLERANCE[np.dtype(dtype)]
    for key in expected:
        err = max_rel_error(got[key], expected[key])
        assert err <= tol, f"{key}: relative error {err:.3g} against PyTorch"


def test_cells_pytorch_lacks_extend_its_parameter_names():
    """Peephole LSTM and reset-before GRU have no PyTorch module (the gradient checks cover
    their maths); their parameters follow PyTorch's naming, peepholes as peephole_l{k}."""
    m = fastrnn.LSTM(3, 4, peephole=True, backend="reference")
    assert m.params["peephole_l0"].shape == (3, 4)
    g = fastrnn.GRU(3, 4, reset_after=False, backend="reference")
    assert set(g.params) == {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"}
