"""What one timed call of a case does, for a fastrnn backend, PyTorch and ONNX Runtime.

``prepare(case, impl)`` builds the layer and the inputs outside the timing and returns a callable
with no arguments that does one timed unit of work (``cases`` says what each kind means). All
implementations get the same input, initial state and output gradient, and weights drawn from the
same distribution (ONNX Runtime runs the fastrnn layer itself, exported by ``fastrnn.onnx``: the
same weights). ONNX Runtime has no training: it runs the infer and step cases only (``runs``).
The pytest-benchmark suite and the report's workers both time these callables, so they measure
the same thing.
"""
import dataclasses
import importlib.util
import os
import time

import numpy as np

import fastrnn
from fastrnn.dispatch import AUTO_ORDER

__all__ = ["TORCH", "ORT", "REFERENCES", "prepare", "runs", "tiny", "set_threads", "choose",
           "warm_up", "numba_cache_place", "have_ort", "TORCH_INSTALL", "ORT_INSTALL",
           "ORT_NO_TRAIN"]

TORCH = "torch"   # the implementation name of PyTorch
ORT = "onnxruntime"   # ONNX Runtime; every name but these two is a fastrnn backend
REFERENCES = (TORCH, ORT)
TORCH_INSTALL = "pip install torch==2.13.0"
ORT_INSTALL = "pip install onnx onnxruntime"
ORT_NO_TRAIN = "ONNX Runtime runs inference only: no training to time"
DTYPE = np.float32

# ONNX Runtime's threads belong to a session, not to the process: set_threads keeps the count
# for the sessions prepare builds afterwards (None: ONNX Runtime's default)
_ort_threads = None


def tiny(case):
    """The same layer structure at toy sizes: compiles the same JIT specialisations cheaply."""
    return dataclasses.replace(case, batch=2, input_size=3, hidden=4, steps=3)


def set_threads(impl, n):
    """``n`` threads for ``impl``: torch.set_num_threads, fastrnn.set_num_threads, or the
    intra-op threads of the ONNX Runtime sessions built from now on."""
    global _ort_threads
    if impl == TORCH:
        import torch
        torch.set_num_threads(n)
    elif impl == ORT:
        _ort_threads = n
    else:
        fastrnn.set_num_threads(n)


def have_ort():
    """ONNX Runtime can be timed: onnxruntime runs the model, onnx writes it (fastrnn.onnx)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def runs(case, impl):
    """Whether ``impl`` has something to time for ``case``: all but ONNX Runtime's training."""
    return not (impl == ORT and case.kind == "train")


def choose(wanted, option, torch_by_default):
    """``impls, not_timed``: the implementations to time and, for every other fastrnn backend,
    PyTorch and ONNX Runtime, ``(name, why it is not timed)``, so a run can say so at its top.

    ``wanted``: names asked for by ``option`` (an environment variable or a command-line option,
    named in the messages); empty means every compiled backend available here (the reference
    only if there is none), and PyTorch too when ``torch_by_default`` (ONNX Runtime only when
    named). A name asked for that cannot be timed raises RuntimeError saying why."""
    available = fastrnn.backends()
    have_torch = importlib.util.find_spec("torch") is not None
    ort_here = have_ort()
    known = sorted(AUTO_ORDER, key=AUTO_ORDER.index, reverse=True) + [TORCH, ORT]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise RuntimeError(f"{option}: expected names among {known}, got {unknown}")
    if wanted:
        impls = list(wanted)
    else:
        impls = [b for b in available if b != "reference"] or ["reference"]
        if torch_by_default and have_torch:
            impls = [TORCH] + impls
    missing = {}
    for name in impls:
        if name == TORCH and not have_torch:
            missing[name] = f"not installed ({TORCH_INSTALL})"
        elif name == ORT and not ort_here:
            missing[name] = f"not installed ({ORT_INSTALL})"
        elif name not in REFERENCES and name not in available:
            missing[name] = _why_unavailable(name)
    if missing:  # asked for something that isn't here: fail loudly, don't skip
        raise RuntimeError(f"{option} asks for what cannot be timed here: " + "; ".join(
            f"{name}: {why}" for name, why in missing.items()))
    not_timed = []
    for name in known:
        if name in impls:
            continue
        if name == TORCH:
            why = (f"not installed ({TORCH_INSTALL})" if not have_torch
                   else f"installed; timed only when {option} names it")
        elif name == ORT:
            why = (f"not installed ({ORT_INSTALL})" if not ort_here
                   else f"installed; timed only when {option} names it")
        elif name not in available:
            why = _why_unavailable(name)
        elif wanted:
            why = f"not named in {option}"
        else:
            why = f"the NumPy oracle, timed only when {option} names it"
        not_timed.append((name, why))
    return impls, not_timed


def _why_unavailable(backend):
    try:
        fastrnn.get_backend(backend)
    except fastrnn.BackendUnavailable as exc:
        return str(exc)
    return "available"


def numba_cache_place():
    """Where Numba keeps the compiled kernels between runs."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"] + " (NUMBA_CACHE_DIR)"
    return os.path.join(os.path.dirname(fastrnn.__file__), "_numba", "__pycache__")


def warm_up(pairs, say):
    """Build every ``(case, impl)`` of ``pairs`` and call it once, before any timing: Numba
    compiles its kernels here (or loads them from its cache), libraries start their threads.
    ``say`` gets one line per implementation, as each is done, with the seconds it took. The
    cases are dropped again (the benchmarks build their own: no memory held for all at once).
    Returns ``{(case name, impl): exception}`` for the cases that failed."""
    say("warm-up before any timing: every case built and called once on each implementation "
        f"(Numba compiles its kernels here, or loads them from its cache in {numba_cache_place()})")
    failures = {}
    for impl in dict.fromkeys(i for _, i in pairs):     # one implementation after another
        cases = [case for case, i in pairs if i == impl]
        start = time.perf_counter()
        for case in cases:
            try:
                prepare(case, impl, warm=1)
            except Exception as exc:
                failures[case.name, impl] = exc
        failed = sum(1 for _, i in failures if i == impl)
        say(f"  {impl}: {len(cases)} cases in {time.perf_counter() - start:.1f} s"
            + (f", {failed} FAILED (their benchmarks show why)" if failed else ""))
    return failures


def _data(case, seed):
    """x (T, B, I), the initial state parts (L*D, B, H) and dy (T, B, D*H), all float32."""
    rng = np.random.default_rng(seed)
    T, B, I, H = case.steps, case.batch, case.input_size, case.hidden
    LD = case.layers * case.directions
    x = rng.standard_normal((T, B, I)).astype(DTYPE)
    num_state_parts = 2 if case.mode == "LSTM" else 1
    state = [(0.5 * rng.standard_normal((LD, B, H))).astype(DTYPE)
             for _ in range(num_state_parts)]
    dy = rng.standard_normal((T, B, case.directions * H)).astype(DTYPE)
    return x, state, dy


def _fastrnn_layer(case, backend, seed):
    cls = getattr(fastrnn, case.mode)
    layers = 1 if case.kind == "step" else case.layers
    return cls(case.input_size, case.hidden, layers, bidirectional=case.bidirectional,
               dtype=DTYPE, backend=backend, seed=seed)


def _prepare_fastrnn(case, backend, seed):
    m = _fastrnn_layer(case, backend, seed)
    x, state_parts, dy = _data(case, seed)
    state = tuple(state_parts) if len(state_parts) == 2 else state_parts[0]

    if case.kind == "train":
        def run():
            y, _, cache = m.forward(x, state, train=True)
            m.zero_grad()
            m.backward(dy, cache)       # dx, dstate0 returned; parameter gradients in m.grads
    elif case.kind == "infer":
        def run():
            m(x)
    else:  # step: one-step inputs (1, B, I), the state carried from call to call
        xs = [x[t:t + 1] for t in range(case.steps)]
        step_state = tuple(p[:1] for p in state_parts) if len(state_parts) == 2 \
            else state_parts[0][:1]

        def run():
            s = step_state
            for x_t in xs:
                _, s = m(x_t, s)
    return run, m


def _prepare_torch(case, seed):
    import torch

    # PyTorch's default initialisation draws from the same uniform(-1/sqrt(H), 1/sqrt(H)) as
    # fastrnn's, so the weights are alike (not equal) without building a second model here
    torch.manual_seed(seed)
    x, state_parts, dy = _data(case, seed)
    as_tensor = torch.from_numpy                       # shares memory: no copies to count

    if case.kind == "step":
        cell = getattr(torch.nn, case.mode + "Cell")(case.input_size, case.hidden)
        xs = [as_tensor(x[t]) for t in range(case.steps)]        # (B, I) each
        step_state = tuple(as_tensor(p[0]) for p in state_parts)  # (B, H) each
        step_state = step_state if len(step_state) == 2 else step_state[0]

        def run():
            with torch.no_grad():
                s = step_state
                for x_t in xs:
                    s = cell(x_t, s)
        return run, cell

    module = getattr(torch.nn, case.mode)(case.input_size, case.hidden, case.layers,
                                          bidirectional=case.bidirectional)
    x_t = as_tensor(x)

    if case.kind == "infer":
        def run():
            with torch.no_grad():
                module(x_t)
        return run, module

    x_t.requires_grad_(True)
    state_t = tuple(as_tensor(p).requires_grad_(True) for p in state_parts)
    state_arg = state_t if len(state_t) == 2 else state_t[0]
    dy_t = as_tensor(dy)

    def run():
        module.zero_grad()              # set_to_none: backward allocates the gradients afresh
        x_t.grad = None
        for s in state_t:
            s.grad = None
        y, _ = module(x_t, state_arg)
        y.backward(dy_t)                # gradients of x, the initial state and the parameters
    return run, module


def _prepare_ort(case, seed):
    if not runs(case, ORT):
        raise ValueError(f"case: {case.name} is a {case.kind} case; {ORT_NO_TRAIN}")
    import onnxruntime

    from fastrnn import onnx as fastrnn_onnx

    # the layer the fastrnn runners build, with the same weights, as one ONNX model
    layer = _fastrnn_layer(case, "reference", seed)
    x, state_parts, _ = _data(case, seed)
    step = case.kind == "step"
    model = fastrnn_onnx.export(layer, lengths=False, initial_state=step)
    options = onnxruntime.SessionOptions()
    if _ort_threads is not None:
        options.intra_op_num_threads = _ort_threads
    options.inter_op_num_threads = 1        # one node at a time: the graph is a chain
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])

    if case.kind == "infer":
        def run():
            session.run(None, {"x": x})     # no h0/c0 inputs: the zero initial state
        return run, session

    # step: one-step inputs (1, B, I), the final state fed back as the next initial state
    xs = [x[t:t + 1] for t in range(case.steps)]
    state_names = ["h0", "c0"][:len(state_parts)]
    step_state = [p[:1] for p in state_parts]

    def run():
        s = step_state
        for x_t in xs:
            _, *s = session.run(None, {"x": x_t, **dict(zip(state_names, s))})
    return run, session


def prepare(case, impl, seed=0, warm=2):
    """``run, model``: ``run()`` does one timed unit of ``case`` on ``impl`` (``"torch"``,
    ``"onnxruntime"`` or a fastrnn backend name); it has been called ``warm`` times already (JIT
    compiled, caches filled). ``model`` is the layer (ONNX Runtime: the InferenceSession), for
    inspection. ONNX Runtime's train cases raise ValueError (``runs``)."""
    if impl == TORCH:
        run, model = _prepare_torch(case, seed)
    elif impl == ORT:
        run, model = _prepare_ort(case, seed)
    else:
        run, model = _prepare_fastrnn(case, impl, seed)
    for _ in range(warm):
        run()
    return run, model
