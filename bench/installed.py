"""Which fastrnn the benchmarks time: the installed package, not the checkout's source tree.

Run from a checkout, Python finds the checkout's ``fastrnn/`` first: ``python -m`` puts the
current directory on ``sys.path``, and pytest puts the folder above ``bench/`` there. After
``pip install .`` that source tree has no compiled extension (pip builds it into site-packages),
so the Cython backend would silently be missing from every run. Hence, when fastrnn is installed
somewhere other than this checkout, ``use_installed()`` imports that copy; with an editable
install (``pip install -e .``) or none at all, the checkout is the package. ``bench/__init__.py``
calls it, so the pytest suite, ``bench.report``, its workers and ``bench.profile`` all time the
same copy, and ``summary()`` says which one at the top of every run.
"""
import filecmp
import importlib.util
import os
import sys

__all__ = ["CHECKOUT", "use_installed", "summary"]

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE = os.path.join(CHECKOUT, "fastrnn")


def _same_dir(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _installed_spec():
    """The spec of the fastrnn that Python finds with the checkout left out of ``sys.path``
    (site-packages, or an editable install's finder); None if there is none."""
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not _same_dir(p or os.getcwd(), CHECKOUT)]
    try:
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec("fastrnn", None) if find_spec else None
            if spec is not None and spec.origin:
                return spec
        return None
    finally:
        sys.path[:] = saved


def use_installed():
    """Import fastrnn from its installed copy when there is one outside this checkout.

    Must run before anything imports fastrnn. If fastrnn was already imported from the
    checkout while another copy is installed, raises ImportError (the two cannot be swapped
    within one process)."""
    spec = _installed_spec()
    if spec is None or _same_dir(os.path.dirname(spec.origin), _SOURCE):
        return
    loaded = sys.modules.get("fastrnn")
    if loaded is not None:
        if _same_dir(os.path.dirname(loaded.__file__), _SOURCE):
            raise ImportError(
                f"fastrnn was imported from this checkout ({_SOURCE}) before bench could "
                f"import the installed copy ({os.path.dirname(spec.origin)}); import bench first")
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastrnn"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["fastrnn"]
        raise


def _stale_files(package_dir):
    """Python files of this checkout's fastrnn/ that the copy in ``package_dir`` lacks or has
    with other contents: the installed package is older (or newer) than the checkout."""
    stale = []
    for folder, dirs, files in os.walk(_SOURCE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, _SOURCE)
                other = os.path.join(package_dir, relative)
                if not (os.path.exists(other) and filecmp.cmp(path, other, shallow=False)):
                    stale.append("fastrnn/" + relative)
    return sorted(stale)


def summary():
    """Lines saying which fastrnn this process imported and why."""
    import fastrnn
    package_dir = os.path.dirname(os.path.abspath(fastrnn.__file__))
    if _same_dir(package_dir, _SOURCE):
        where = "this checkout (an editable install, or not installed)"
        return [f"fastrnn {fastrnn.__version__} from {package_dir}: {where}"]
    lines = [f"fastrnn {fastrnn.__version__} from {package_dir}: the installed package "
             f"(not this checkout's source tree, {_SOURCE})"]
    stale = _stale_files(package_dir) if os.path.isdir(_SOURCE) else []
    if stale:
        shown = ", ".join(stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
        lines.append(f"WARNING: the installed package differs from this checkout in {shown}: "
                     "`pip install .` again to time the checkout's code")
    return lines
