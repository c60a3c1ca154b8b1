"""``python -m fastrnn._numba.background float32:forward_rows float32:backward ...``: compile
the backend's loops into Numba's cache, in the order given (the process that fastrnn._numba
starts for a call whose loops are not in the cache; see its "background" compile mode)."""
import sys

import numpy as np


def main(argv):
    from fastrnn import _numba

    for item in argv:
        dtype, name = item.split(":")
        _numba._kernel(np.dtype(dtype), name)


if __name__ == "__main__":
    main(sys.argv[1:])
