"""What ``fastrnn.quantize`` buys at inference: a bfloat16 or int8 copy of a float32 layer
against the float32 layer, PyTorch (float32, ``quantize_dynamic`` int8, bfloat16) and ONNX
Runtime (float32, ``onnxruntime.quantization.quantize_dynamic`` int8, with ``reduce_range`` on
CPUs without VNNI, as ONNX Runtime advises), time and error.

    python -m bench.quantized [--backends cython,numba] [--cases NAME,...] [--rounds 7]
                              [--repeat 5] [--markdown FILE]

The cases are bench/cases.py's inference cases lstm-infer-512-b1, gru-infer-1024-b2,
lstm-infer-256-b4 and bilstm-infer, all with one layer (cases.py's bilstm-infer has two), a
float32 input and the zero initial state. Every implementation runs the same weights (the
fastrnn layer's: PyTorch loads its parameters, whose names are PyTorch's; ONNX Runtime runs the
model ``fastrnn.onnx.export`` writes of it) on the same input.

Each round times every implementation once, in turn (alternating; PyTorch in a process of its
own, as in bench/regularizers.py: its OpenMP threads and fastrnn's would otherwise spin on each
other's cores; ONNX Runtime in this process, as bench/runners.py runs it); a figure is the
median over rounds of the best of ``--repeat`` calls, a speedup the median of the per-round
ratios. Before each implementation's calls the script sleeps ``SETTLE`` seconds, so that the
threads of the one before have stopped spinning (ONNX Runtime's spin for up to ~0.1 s after a
run, on the cores the next one needs; bench.report's ``--settle`` does the same). fastrnn,
PyTorch and ONNX Runtime (intra-op; inter-op 1) on 2 threads. Under the table, per case, the
share of the machine that other processes kept busy during the rounds (bench.worker.OtherLoad,
less the PyTorch process's own CPU time; median and max over rounds): where it is high, the
figures are slower than the code.

The error of a quantized output y_q against its float32 reference y (fastrnn's bf16 and int8
against the fastrnn float32 layer, PyTorch's against PyTorch float32, ONNX Runtime's against
ONNX Runtime float32) is max|y_q - y| / max|y| and mean|y_q - y| / mean|y|, over the whole
output sequence. PyTorch and ONNX Runtime are optional: without them their rows are left out.
"""
import argparse
import dataclasses
import importlib.util
import logging
import os
import resource
import statistics
import tempfile
import time
import warnings

import numpy as np

import fastrnn
from bench import installed
from bench.cases import BY_NAME
from bench.options import ChildTimer, _best, cpu_name, report
from bench.runners import ORT_INSTALL, TORCH_INSTALL, have_ort
from bench.worker import OtherLoad

THREADS = 2
SEED = 0
SETTLE = 0.3        # seconds of sleep before each implementation's calls in a round

# bench/cases.py's inference cases, one layer each (bilstm-infer has two there)
SHAPES = tuple(dataclasses.replace(BY_NAME[name], layers=1) for name in (
    "lstm-infer-512-b1", "gru-infer-1024-b2", "lstm-infer-256-b4", "bilstm-infer"))

FORMATS = (("bf16", "bfloat16"), ("int8", "int8"))     # (label, fastrnn.quantize's weights)
TORCH_F32, TORCH_INT8, TORCH_BF16 = "PyTorch f32", "PyTorch int8", "PyTorch bf16"
ORT_F32, ORT_INT8 = "ORT f32", "ORT int8"


def _cpu_has_vnni():
    """Whether the CPU multiplies bytes without an int16 intermediate (AVX-512 VNNI or
    AVX-VNNI). Without it ONNX Runtime's u8 x s8 products saturate pairs of terms in int16, and
    its quantization guide says to quantize with ``reduce_range`` (7-bit weights): measured
    without it, max error 0.10 of max |y| on lstm-infer-512-b1 (AMD EPYC, Zen 3)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_vnni" in flags or "avx_vnni" in flags
    except OSError:
        pass
    return True


def _f32_label(backend):
    return f"fastrnn f32 ({backend})"


def _q_label(short):
    return f"fastrnn {short}"


def _cpu_seconds():
    """CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _relative_errors(y, reference):
    """(max|y - ref| / max|ref|, mean|y - ref| / mean|ref|), in float64."""
    y = np.asarray(y, np.float64)
    reference = np.asarray(reference, np.float64)
    diff = np.abs(y - reference)
    return (float(diff.max() / np.abs(reference).max()),
            float(diff.mean() / np.abs(reference).mean()))


def _layer(case, backend):
    return getattr(fastrnn, case.mode)(case.input_size, case.hidden, 1,
                                       bidirectional=case.bidirectional, dtype=np.float32,
                                       backend=backend, seed=SEED)


def _input(case):
    rng = np.random.default_rng(SEED)
    return rng.standard_normal((case.steps, case.batch, case.input_size)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# PyTorch, in a process of its own

def _torch_modules(mode, input_size, hidden, bidirectional, params):
    """``{label: (module, input dtype)}``: PyTorch's float32 module with ``params`` (fastrnn's,
    by PyTorch's names), its dynamically quantized int8 copy and its bfloat16 copy; and notes on
    what is left out."""
    import copy

    import torch
    nn = torch.nn
    f32 = getattr(nn, mode)(input_size, hidden, 1, bidirectional=bidirectional)
    f32.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()},
                        strict=True)
    f32.eval()
    modules = {TORCH_F32: (f32, torch.float32)}
    with warnings.catch_warnings():
        # torch.ao.quantization and quantize_per_tensor warn that they are deprecated
        warnings.simplefilter("ignore")
        # quantize_dynamic swaps the children of the module it is given, never that module
        # itself: a bare nn.LSTM would come back as the float32 nn.LSTM it was
        wrapped = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(f32)), {nn.LSTM, nn.GRU}, dtype=torch.qint8)
    int8 = wrapped[0]
    expected = getattr(torch.ao.nn.quantized.dynamic, mode)
    if type(int8) is not expected:
        raise AssertionError(f"quantize_dynamic left {type(int8).__qualname__}, expected "
                             f"{expected.__module__}.{expected.__qualname__}")
    modules[TORCH_INT8] = (int8, torch.float32)
    notes = {}
    # bfloat16: the float32 module cast, on bfloat16 inputs. PyTorch 2.13 runs it on this CPU
    # (AVX-512 BF16/AMX) as fast as float32 or faster (about 2x on the LSTM cases of B >= 4),
    # so it is kept; should a build refuse it, it is left out with a note.
    try:
        bf16 = copy.deepcopy(f32).to(torch.bfloat16)
        with torch.no_grad():
            bf16(torch.zeros(1, 1, input_size, dtype=torch.bfloat16))
        modules[TORCH_BF16] = (bf16, torch.bfloat16)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        notes[TORCH_BF16] = f"left out: PyTorch failed on bfloat16 ({exc})"
    return modules, notes


def _torch_process(connection, mode, input_size, hidden, bidirectional, params, x, repeat):
    """Build the PyTorch modules, send ``(labels, outputs, notes)`` once, then per request
    (until a False one) the best of ``repeat`` calls of each module and the CPU seconds this
    process spent meanwhile."""
    try:
        import torch
        torch.set_num_threads(THREADS)
        modules, notes = _torch_modules(mode, input_size, hidden, bidirectional, params)
        x32 = torch.from_numpy(x)
        runners, outputs = [], {}
        for label, (module, dtype) in modules.items():
            xt = x32.to(dtype)

            def run(module=module, xt=xt):
                with torch.no_grad():
                    return module(xt)[0]
            outputs[label] = run().float().numpy()          # also the warm-up
            runners.append(run)
        connection.send((list(modules), outputs, notes))
    except BaseException:
        import traceback
        connection.send(traceback.format_exc())
        raise
    while connection.recv():
        start = _cpu_seconds()
        best = [_best(fn, repeat) for fn in runners]
        connection.send((best, _cpu_seconds() - start))


class _TorchChild(ChildTimer):
    """PyTorch's modules in a spawned process; ``time()`` returns the best of ``repeat``
    calls of each, in the order of ``labels``, and the CPU seconds the process spent."""

    def __init__(self, case, params, x, repeat):
        super().__init__(_torch_process, case.mode, case.input_size, case.hidden,
                         case.bidirectional, {k: np.array(v) for k, v in params.items()}, x,
                         repeat)
        first = self.connection.recv()
        if isinstance(first, str):
            self.process.join()
            raise RuntimeError(f"the PyTorch process failed:\n{first}")
        self.labels, self.outputs, self.notes = first


# --------------------------------------------------------------------------------------------
# ONNX Runtime, in this process

def _ort_sessions(layer):
    """``(sessions, notes)``: ``{label: InferenceSession}`` of the float32 model
    ``fastrnn.onnx.export`` writes of ``layer`` (no lengths, zero initial state) and of its
    ``onnxruntime.quantization.quantize_dynamic`` int8 copy, when ONNX Runtime quantizes the
    layer's node (it has DynamicQuantizeLSTM, no quantized GRU or RNN)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from fastrnn import onnx as fastrnn_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1        # one node at a time: the graph is a chain

    def session(model_bytes):
        return onnxruntime.InferenceSession(model_bytes, options,
                                            providers=["CPUExecutionProvider"])

    sessions, notes = {}, {}
    with tempfile.TemporaryDirectory(prefix="fastrnn-quantized-") as folder:
        f32_path = os.path.join(folder, "f32.onnx")
        int8_path = os.path.join(folder, "int8.onnx")
        f32_model = fastrnn_onnx.export(layer, f32_path, lengths=False, initial_state=False)
        sessions[ORT_F32] = session(f32_model.SerializeToString())
        # the quantizer logs "Please consider to run pre-processing" on the root logger
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(f32_path, int8_path, weight_type=QuantType.QInt8,
                             reduce_range=not _cpu_has_vnni())
        finally:
            logging.disable(logging.NOTSET)
        int8_model = onnx.load(int8_path)
    ops = [(node.domain or "ai.onnx", node.op_type) for node in int8_model.graph.node]
    left_float = sorted({op for domain, op in ops
                         if domain == "ai.onnx" and op in ("LSTM", "GRU", "RNN")})
    if left_float:
        notes[ORT_INT8] = (f"absent: onnxruntime's quantize_dynamic left the {left_float[0]} "
                           f"node in float32 (it quantizes LSTM only, as DynamicQuantizeLSTM)")
    elif not any(op.startswith("DynamicQuantize") for _, op in ops):
        notes[ORT_INT8] = f"absent: no quantized recurrent node in the model ({ops})"
    else:
        sessions[ORT_INT8] = session(int8_model.SerializeToString())
    return sessions, notes


# --------------------------------------------------------------------------------------------

def measure(backends, rounds, repeat, cases=None, with_torch=True, with_ort=True,
            settle=SETTLE):
    """Rows, one per (case, implementation): ``case``, ``impl``, ``ms`` (None when the
    implementation is absent for the case, with ``note`` saying why); the fastrnn bf16 and
    int8 rows also ``speedup`` ``{label: median of the per-round time ratios}`` over the
    float32 layer of ``backends[0]``, PyTorch int8 and ORT int8 (those present), and the rows
    of quantized outputs ``error`` ``(against, max-relative, mean-relative)``; the float32
    PyTorch and ONNX Runtime rows carry their error against the fastrnn float32 layer, to show
    that they compute the same function. Every row has ``others`` (median, max over rounds
    of the share of the machine other processes kept busy during the case's rounds).
    ``settle``: seconds of sleep before each implementation's calls in a round."""
    fastrnn.set_num_threads(THREADS)
    rows = []
    for case in SHAPES:
        if cases and case.name not in cases:
            continue
        x = _input(case)
        labels, runners, outputs, notes = [], [], {}, {}
        base = None
        for backend in backends:
            layer = _layer(case, backend)
            if base is None:
                base = layer
            else:           # the same seed draws the same weights; make sure of it
                layer.load_state_dict(base.state_dict())
            labels.append(_f32_label(backend))
            runners.append(lambda layer=layer: layer(x))
        for short, weights in FORMATS:
            q = fastrnn.quantize(base, weights)
            label = _q_label(short)
            if q.backend != "cython":
                label += f" ({q.backend})"
            labels.append(label)
            runners.append(lambda q=q: q(x))
        if with_ort:
            sessions, ort_notes = _ort_sessions(base)
            notes.update(ort_notes)
            for label, sess in sessions.items():
                labels.append(label)
                runners.append(lambda sess=sess: sess.run(None, {"x": x}))
        for label, fn in zip(labels, runners):
            outputs[label] = np.array(fn()[0])          # also the warm-up
        child = _TorchChild(case, base.params, x, repeat) if with_torch else None
        if child is not None:
            outputs.update(child.outputs)
            notes.update(child.notes)
        all_labels = labels + (child.labels if child is not None else [])
        times = {label: [] for label in all_labels}
        others = []                 # per round: the share of the machine others kept busy
        try:
            for _ in range(rounds):
                load, start, child_cpu = OtherLoad(), time.perf_counter(), 0.0
                load.start()
                for label, fn in zip(labels, runners):
                    time.sleep(settle)
                    times[label].append(_best(fn, repeat))
                if child is not None:
                    time.sleep(settle)
                    best, child_cpu = child.time()
                    for label, seconds in zip(child.labels, best):
                        times[label].append(seconds)
                share = load.stop()     # counts the PyTorch process as another: take it off
                machine = (time.perf_counter() - start) * (os.cpu_count() or 1)
                others.append(max(0.0, share - child_cpu / machine))
        finally:
            if child is not None:
                child.close()

        f32 = _f32_label(backends[0])
        against = {_q_label("bf16"): f32, _q_label("int8"): f32, TORCH_INT8: TORCH_F32,
                   TORCH_BF16: TORCH_F32, ORT_INT8: ORT_F32, TORCH_F32: f32, ORT_F32: f32}
        over = (f32, TORCH_INT8, ORT_INT8)
        present = set(all_labels) | set(notes)
        order = [label for label in labels if not label.startswith("ORT")] + [
            label for label in (ORT_F32, ORT_INT8, TORCH_F32, TORCH_INT8, TORCH_BF16)
            if label in present]
        for label in order:
            row = {"case": case.name, "impl": label,
                   "others": (statistics.median(others), max(others))}
            if label in notes:
                row.update(ms=None, note=notes[label])
                rows.append(row)
                continue
            row["ms"] = statistics.median(times[label]) * 1e3
            if label.startswith(("fastrnn bf16", "fastrnn int8")):
                row["speedup"] = {other: statistics.median(
                    b / a for a, b in zip(times[label], times[other]))
                    for other in over if other in times}
            reference = next((ref for key, ref in against.items()
                              if label.startswith(key)), None)
            if reference in outputs:
                row["error"] = (reference,) + _relative_errors(outputs[label],
                                                               outputs[reference])
            rows.append(row)
    return rows


def markdown(rows, rounds, repeat):
    base = next((r["impl"] for r in rows if r["impl"].startswith("fastrnn f32")), "fastrnn f32")
    over = (base, TORCH_INT8, ORT_INT8)
    lines = [f"CPU: {cpu_name()}; inference, one layer, float32 input, zero initial state; "
             f"{THREADS} threads each (PyTorch in its own process); medians of {rounds} "
             f"alternating rounds, best of {repeat} calls each; speedup: the other's time / "
             f"this one's, median of the per-round ratios", "",
             "| case | implementation | ms | speedup over " + " | over ".join(over) + " |",
             "|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        if r["ms"] is None:
            notes.append(f"- {r['case']}, {r['impl']}: {r['note']}")
            lines.append(f"| {r['case']} | {r['impl']} | — | | | |")
            continue
        speedup = r.get("speedup", {})
        cells = [f"{speedup[o]:.2f}" if o in speedup else "" for o in over]
        lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.2f} | " + " | ".join(cells)
                     + " |")
    loads = {r["case"]: r["others"] for r in rows}
    notes += [f"- {case}: other processes kept {median:.0%} of the machine busy during the "
              f"rounds (median; max {top:.0%})" for case, (median, top) in loads.items()]
    if any(r["impl"] == ORT_INT8 and r["ms"] is not None for r in rows) and not _cpu_has_vnni():
        notes.append(f"- {ORT_INT8}: quantized with reduce_range (7-bit weights), as ONNX "
                     f"Runtime advises for CPUs without VNNI (this one)")
    if notes:
        lines += [""] + notes
    lines += ["", "Error of each output against its float32 reference, over all of y "
              "(the float32 rows: PyTorch's and ONNX Runtime's against fastrnn's)", "",
              "| case | output | against | max abs err / max abs ref | "
              "mean abs err / mean abs ref |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            against, top, mean = r["error"]
            lines.append(f"| {r['case']} | {r['impl']} | {against} | {top:.2e} | {mean:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="cython",
                   help="fastrnn backends of the float32 layer (the first: the speedups' base)")
    p.add_argument("--cases", default=",".join(case.name for case in SHAPES),
                   help="comma-separated, of " + ", ".join(case.name for case in SHAPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--markdown", metavar="FILE", help="also write the tables to this file")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeat < 1:
        p.error("--rounds and --repeat: expected at least 1")
    for line in installed.summary():       # which fastrnn is timed, as bench.report says
        print(line)
    backends = [b for b in args.backends.split(",") if b]
    if not backends:
        p.error("--backends: name at least one fastrnn backend")
    missing = [b for b in backends if b not in fastrnn.backends()]
    if missing:
        p.error(f"--backends: not available here: {missing} (available: "
                f"{', '.join(fastrnn.backends())})")
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in {case.name for case in SHAPES}]
    if unknown or not cases:
        p.error(f"--cases: unknown {unknown}; known: "
                f"{', '.join(case.name for case in SHAPES)}")
    with_torch = importlib.util.find_spec("torch") is not None
    with_ort = have_ort()
    if not with_torch:
        print(f"not timed: PyTorch: not installed ({TORCH_INSTALL})")
    if not with_ort:
        print(f"not timed: ONNX Runtime: not installed ({ORT_INSTALL})")
    rows = measure(backends, args.rounds, args.repeat, cases=cases, with_torch=with_torch,
                   with_ort=with_ort)
    report(markdown(rows, args.rounds, args.repeat), args.markdown)


if __name__ == "__main__":
    main()
