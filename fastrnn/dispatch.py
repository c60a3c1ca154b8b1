"""Which kernel backends exist on this machine, and which one ``backend="auto"`` takes.

Every backend is a module with ``layer_forward`` and ``layer_backward`` (the contract in
``fastrnn.cells``). A backend that cannot be imported is unavailable, and asking for it raises
``BackendUnavailable`` with the reason; nothing falls back silently.
"""
import importlib
import numbers
import os


__all__ = ["BackendUnavailable", "backends", "get_backend", "resolve", "set_num_threads",
           "AUTO_ORDER"]

_MODULES = {
    "reference": "fastrnn.reference",
    "numba": "fastrnn._numba",
    "cython": "fastrnn._cy",
}
_HOW_TO_FIX = {
    "numba": "install Numba (pip install numba)",
    "cython": "build the extension: pip install . (needs a C compiler)",
}
# "auto" takes the first available of these: the order comes from bench/RESULTS.md (the
# backend whose worst case against the other is the smaller comes first).
AUTO_ORDER = ("cython", "numba", "reference")

_loaded = {}   # name -> module
_errors = {}   # name -> why it could not be loaded


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot be used here."""


def _load(name):
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
        if not (hasattr(module, "layer_forward") and hasattr(module, "layer_backward")):
            raise ImportError(f"{_MODULES[name]} has no layer_forward/layer_backward")
    except Exception as exc:  # an unusable backend, for whatever reason, is reported, not fatal
        _errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = module
    return module


def backends():
    """The names of the backends available here, e.g. ``['reference', 'numba', 'cython']``."""
    return [name for name in _MODULES if _load(name) is not None]


def resolve(name="auto"):
    """The concrete backend name for ``name`` ("auto" honours FASTRNN_BACKEND)."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, got {type(name).__name__}")
    if name == "auto":
        override = os.environ.get("FASTRNN_BACKEND", "").strip()
        if override and override != "auto":
            if override not in _MODULES:
                raise BackendUnavailable(
                    f"FASTRNN_BACKEND: expected one of {sorted(_MODULES)} or 'auto', "
                    f"got {override!r}")
            return override
        for candidate in AUTO_ORDER:
            if _load(candidate) is not None:
                return candidate
    if name not in _MODULES:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(_MODULES)}, got {name!r}")
    return name


def get_backend(name="auto"):
    """The module of backend ``name``; raises BackendUnavailable saying why if it can't load."""
    name = resolve(name)
    module = _load(name)
    if module is None:
        fix = _HOW_TO_FIX.get(name, "")
        raise BackendUnavailable(
            f"backend {name!r} is not available here ({_errors[name]})"
            + (f"; to fix: {fix}" if fix else ""))
    return module


def set_num_threads(n):
    """Threads of the compiled kernels, in every backend, and of SciPy's BLAS, which both
    compiled backends call (NumPy's BLAS is apart: see ``limit_numpy_blas_threads``).

    A forked child process (``os.fork``, multiprocessing's "fork" start method) starts on one
    thread, as if it had called ``set_num_threads(1)``; calling it there gives the child a pool
    of its own (see ``_after_fork_in_child``)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    # SciPy's BLAS first: the cython backend sizes its passes by the BLAS threads it finds
    blas, _ = _openblas_threads_functions("scipy")
    if blas is not None:
        blas(int(n))
    for name in backends():
        _set_backend_threads(_loaded[name], int(n))


def _set_backend_threads(module, n):
    setter = getattr(module, "set_num_threads", None)
    if setter is not None:
        setter(n)


def _openblas_threads_functions(package):
    """``(set, get)`` of the thread count of the OpenBLAS bundled in ``package``'s wheels
    ("numpy" or "scipy": two libraries, each with its own threads), or ``(None, None)`` where
    it links another BLAS."""
    import ctypes
    import glob
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None, None
    package_dir = os.path.dirname(spec.origin)
    for path in (glob.glob(os.path.join(os.path.dirname(package_dir), f"{package}.libs",
                                        "*openblas*"))                       # Linux, Windows
                 + glob.glob(os.path.join(package_dir, ".dylibs", "*openblas*"))):   # macOS
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""),
                               ("openblas", "64_"), ("openblas", "")):
            setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                return setter, getter
    return None, None


def limit_numpy_blas_threads(n):
    """Run NumPy's own BLAS (``a @ b`` on arrays, what ``fastrnn.train.Linear`` uses) on ``n``
    threads; True if it could be set. OpenBLAS threads spin for a while after each product
    and take the core from the kernels' threads that run next: the main job (LSTM 256, batch
    32) ran 15,100 chars/s with NumPy's BLAS on 2 threads, 20,800 on 1 (AMD EPYC Zen 4, 2
    cores). ``OPENBLAS_NUM_THREADS=1`` in the environment does the same for NumPy and SciPy."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    setter, _ = _openblas_threads_functions("numpy")
    if setter is None:
        return False
    setter(int(n))
    return True


def _after_fork_in_child():
    # Workers of a process pool are usually as many as the cores: each with the parent's thread
    # count, their threads would outnumber the cores, and the kernels' threads meet at every
    # time step, so a thread the scheduler parks stalls the others (measured, cython, a fork
    # Pool(2) on 2 cores, LSTM training T=100 B=32 H=256: 63-66 ms a call with one thread a
    # worker, 230-249 ms with two). The backends themselves make their thread pools usable in
    # the child (GNU OpenMP's does not survive fork: see their fork handlers); this sets the
    # count.
    for module in list(_loaded.values()):
        _set_backend_threads(module, 1)


os.register_at_fork(after_in_child=_after_fork_in_child)
