"""The cell records (fastrnn.cells): each one agrees with its cell's equations, and a record
that does not is caught here, before a kernel could miscompute with it.

The reference step pair of a cell is its definition (fastrnn.reference); every backend is
compared with the reference by the parity tests on the shapes the record gives. So a record is
right when the reference, run on the record's shapes, splits exactly the record's gate blocks
and keeps exactly the record's saved buffers. A new cell brings its record, its step pairs and
its test options (tests/conftest.py), and these tests check the record.
"""
import dataclasses

import numpy as np
import pytest

from fastrnn import cells, reference
from fastrnn.cells import CELLS, Cell, Param, Product


def _run_reference_step(cell, B=3, I=4, H=5, seed=0):
    """One reference forward step on the record's shapes: (new state, saved)."""
    rng = np.random.default_rng(seed)
    shapes = cell.param_shapes(I, H)
    p = {name: rng.standard_normal(shape) * 0.5 for name, shape in shapes.items()}
    x = rng.standard_normal((B, I))
    state = tuple(rng.standard_normal((B, H)) for _ in cell.state_names)
    step_forward, _ = reference.STEPS[cell.name]
    return step_forward(cell, x @ p["w_ih"].T + p["b_ih"], state, p)


def check_record(cell, B=3, H=5):
    """Raise AssertionError where the record disagrees with the cell's reference step."""
    new_state, saved = _run_reference_step(cell, B=B, H=H)
    assert len(new_state) == len(cell.state_names), (
        f"{cell.name}: the step makes {len(new_state)} state arrays, the record names "
        f"{cell.state_names}")
    for name, width in cell.saved:
        assert name in saved, f"{cell.name}: the record saves {name!r}, the step has no such buffer"
        assert saved[name].shape == (B, width * H), (
            f"{cell.name}: saved buffer {name!r} is {saved[name].shape[1] // H}*H wide, the "
            f"record says {width}*H")
    for product in cell.products[1:]:
        assert product.source in saved, f"{cell.name}: no buffer {product.source!r} to multiply"


@pytest.mark.parametrize("name", sorted(CELLS))
def test_record_agrees_with_the_reference_step(name):
    cell = CELLS[name]
    check_record(cell)
    assert cell.name in reference.STEPS
    assert cell.num_gates == len(cell.gate_names)
    assert list(cell.param_shapes(4, 5)) == list(cell.param_names)
    G = cell.num_gates
    assert cell.param_shapes(4, 5)["w_ih"] == (G * 5, 4)
    spec = cell.kernel_spec()
    assert spec[:4] == (cell.code, G, len(cell.state_names), cell.saved_width)


def test_codes_and_names_are_unique():
    assert len({c.code for c in CELLS.values()}) == len(CELLS)
    assert all(key == c.name for key, c in CELLS.items())


@pytest.mark.parametrize("name", sorted(CELLS))
def test_a_wrong_gate_count_is_caught(name):
    """A record with one gate too many or too few: the step refuses the pre-activations."""
    cell = CELLS[name]
    for gate_names in (cell.gate_names + ("extra",), cell.gate_names[:-1]):
        if not gate_names:
            continue
        products = None if cell.phases == 1 else (
            Product("h", tuple(range(len(gate_names) - 1))),
            Product(cell.products[1].source, (len(gate_names) - 1,)))
        wrong = dataclasses.replace(cell, gate_names=gate_names, products=products,
                                    hidden_side=())
        with pytest.raises(ValueError, match="gate count is wrong"):
            _run_reference_step(wrong)


@pytest.mark.parametrize("name", [n for n in sorted(CELLS) if CELLS[n].saved])
def test_a_wrong_buffer_width_is_caught(name):
    """A saved buffer of the wrong width or name: refused when the record is made (a second
    product's source), else by check_record against the reference step."""
    cell = CELLS[name]
    (buffer, width), = cell.saved
    second = cell.products[1:]
    with pytest.raises((ValueError, AssertionError),
                       match=f"of width 1|{buffer!r} is {width}\\*H wide"):
        check_record(dataclasses.replace(cell, saved=((buffer, width + 1),)))
    with pytest.raises(AssertionError, match="saves 'other'"):
        check_record(dataclasses.replace(
            cell, saved=(("other", width),),
            products=(cell.products[0], Product("other", second[0].blocks)) if second else None))


@pytest.mark.parametrize("bad, message", [
    (dict(products=(Product("h", (0, 1)),)), "cover the 3 gate blocks"),
    (dict(products=(Product("h", (0, 2)), Product("rh", (1,)))), "contiguous"),
    (dict(products=(Product("rh", (0, 1, 2)),)), "first product must be of h"),
    (dict(products=(Product("h", (0, 1)), Product("nothing", (2,)))), "first saved buffer"),
    (dict(products=(Product("h", (0, 1)), Product("rh", (2,))), saved=(("rh", 2),)),
     "of width 1"),
    (dict(products=(Product("h", (0,)), Product("rh", (1,)), Product("rh", (2,))),
          saved=(("rh", 1),)), "at most two products"),
    (dict(hidden_side=(3,)), "hidden_side"),
    (dict(saved=(("hn", 0),)), "width >= 1"),
    (dict(state_names=("c", "h")), "state_names"),
])
def test_a_malformed_record_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Cell("bad", 99, "GRU", ("r", "z", "n"), **bad)


def test_parameters_come_from_the_record():
    assert cells.LSTM_PEEPHOLE.param_names == ("w_ih", "w_hh", "b_ih", "b_hh", "peephole")
    assert cells.LSTM_PEEPHOLE.param_shapes(7, 3)["peephole"] == (3, 3)
    assert cells.GRU.param_shapes(7, 3) == {"w_ih": (9, 7), "w_hh": (9, 3), "b_ih": (9,),
                                            "b_hh": (9,)}
    extra = Param("gain", "gain", ("H",))
    cell = Cell("rnn_gain", 98, "RNN", ("h",), extra_params=(extra,))
    assert cell.param_shapes(2, 4)["gain"] == (4,)
    assert cells.GRU_RESET_BEFORE.kernel_spec() == (5, 3, 1, 1, 2, 0, 3)
    assert cells.GRU.kernel_spec() == (4, 3, 1, 1, 3, 1, 2)


def test_a_record_without_a_step_pair_is_refused_by_each_backend():
    """A record whose code no compiled step pair has is refused by name, not run with some
    other cell's step (or none)."""
    import fastrnn
    from conftest import COMPILED_BACKENDS
    unknown = dataclasses.replace(cells.RNN_TANH, name="rnn_unknown", code=99)
    x = np.ones((2, 1, 3), np.float32)
    w = (np.zeros((4, 3), np.float32), np.zeros((4, 4), np.float32),
         np.zeros(4, np.float32), np.zeros(4, np.float32))
    for name in COMPILED_BACKENDS:
        kernels = fastrnn.get_backend(name)
        with pytest.raises(ValueError, match="'rnn_unknown' \\(code 99\\) has no step pair"):
            kernels.layer_forward(unknown, x, (np.zeros((1, 4), np.float32),), w,
                                  np.full(1, 2), False, False, np.empty((2, 1, 4), np.float32),
                                  (np.empty((1, 4), np.float32),))
