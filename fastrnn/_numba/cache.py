"""Numba's on-disk cache, shared safely by several processes.

Numba numbers a function's cache entries in one index file, which a process reads, extends and
writes back when it saves an entry (``numba.core.caching.IndexDataCacheFile.save``). Two
processes that compile two signatures of one function at once (two MPI ranks, two pytest
workers, a float32 and a float64 loop that share their steps) can both read the index before
the other wrote it: both take entry 1, and the index left behind can name the machine code of
the other signature, which a later process then loads and runs (numba/numba#10128 is the same
race for gufuncs). ``install`` makes every save of the backend's entries hold an exclusive lock
on its index (``flock`` on "<index>.lock") and every load a shared one.

``compile_once`` compiles one of the backend's loops under a lock of its own, so that a
process that wants a loop another process is compiling waits and then loads it from the cache
instead of compiling it a second time (a loop takes a minute or more to compile).

Without ``fcntl`` (not POSIX), or on a file system that refuses locks, both run unlocked, as
Numba does.
"""
import contextlib
import os

from numba.core import caching, sigutils
from numba.core.compiler_lock import global_compiler_lock

try:
    import fcntl
except ImportError:
    fcntl = None

# the cache folders of the backend's functions (install adds them): only their files are locked
_folders = set()


@contextlib.contextmanager
def file_lock(path, shared=False):
    """Hold an flock on ``path`` (created if missing) for the block: exclusive, or shared."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:     # a folder we may not write: Numba will not save there either
            fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            except OSError:     # a file system without locks
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)    # releases the lock


def folder(dispatcher):
    """The folder where Numba caches ``dispatcher``'s machine code, or None if it cannot."""
    path = getattr(getattr(dispatcher, "_cache", None), "_cache_path", None)
    return path if isinstance(path, str) else None


def _locked(index_file):
    return os.path.normpath(os.path.dirname(index_file._index_path)) in _folders


def _install_once():
    cls = caching.IndexDataCacheFile
    if getattr(cls, "_fastrnn_locks", False):
        return
    save, load = cls.save, cls.load

    def locked_save(self, key, data):
        if not _locked(self):
            return save(self, key, data)
        with file_lock(self._index_path + ".lock"):
            return save(self, key, data)

    def locked_load(self, key):
        if not _locked(self):
            return load(self, key)
        with file_lock(self._index_path + ".lock", shared=True):
            return load(self, key)

    cls.save, cls.load = locked_save, locked_load
    cls._fastrnn_locks = True


def install(dispatcher):
    """Lock the index files of the cache folder that ``dispatcher`` saves to (the folder of
    every function of its source file, its callees and overloads included)."""
    path = folder(dispatcher)
    if path is not None:
        _folders.add(os.path.normpath(path))
        _install_once()


def compile_once(dispatcher, signature, name):
    """Compile ``dispatcher`` for ``signature`` (or load it from the cache) while holding the
    lock "<name>.lock" in its cache folder, then allow no other signature, as
    ``njit(signature)`` does."""
    if not hasattr(dispatcher, "compile"):     # NUMBA_DISABLE_JIT: the Python function
        return dispatcher
    install(dispatcher)
    path = folder(dispatcher)
    lock = file_lock(os.path.join(path, f"{name}.lock")) if path else contextlib.nullcontext()
    with lock:
        dispatcher.compile(signature)
    dispatcher.disable_compile()
    return dispatcher


def load(dispatcher, signature):
    """Add ``dispatcher``'s machine code for ``signature`` from the cache, compiling nothing:
    True if it was there (or is compiled already), False if not, or if this Numba's internals
    are not the ones used here (the first half of ``Dispatcher.compile``, Numba 0.68)."""
    if not hasattr(dispatcher, "compile"):     # NUMBA_DISABLE_JIT: the Python function
        return True
    install(dispatcher)
    try:
        with global_compiler_lock:
            args, _ = sigutils.normalize_signature(signature)
            if dispatcher.overloads.get(tuple(args)) is None:
                cres = dispatcher._cache.load_overload(signature, dispatcher.targetctx)
                if cres is None:
                    return False
                dispatcher._cache_hits[signature] += 1
                dispatcher.targetctx.insert_user_function(cres.entry_point, cres.fndesc,
                                                          [cres.library])
                dispatcher.add_overload(cres)
    except AttributeError:
        return False
    dispatcher.disable_compile()
    return True
