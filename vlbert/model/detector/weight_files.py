"""Reading published weight files that other people wrote, without running anything they contain.

Three containers occur (DESIGN.md section 6), told apart by their first bytes, never by
the file name:

- torch's zip container (``torch.save`` since 1.6; starts with ``PK``): MILVLG's newer
  ``.pth`` files;
- torch's legacy container (``_use_new_zipfile_serialization=False`` and every torch
  before 1.6): a pickle of torch's magic number 0x1950a86a20f9469cfc6c, then the
  protocol version, system info, the object and the raw storages. VL-BERT's
  ``resnet101-pt-vgbua-0000.model`` and MILVLG's older ``.pth`` files are this;
- a plain pickle of numpy arrays: the detectron2 ports' ``.pkl`` files
  (``{"model": {name: ndarray}, "__author__": ...}``).

Both torch containers go through ``torch.load(weights_only=True)``: tensors, storages and
plain containers only. The numpy pickle goes through ``_InertUnpickler``, which never lets
numpy (or anything else) build an object from pickle data: every global it may name maps
to an inert stand-in that records what the pickle says (a dtype string and its state, a
shape, raw bytes); after unpickling, each recorded array is checked (a plain numeric
dtype without fields, subarrays or objects; declared shape times item size equal to the
bytes present) and only then made with ``np.frombuffer``. Why not numpy's own
constructors: numpy honours the flags a pickled dtype carries, so an object dtype with
its flags cleared makes ``numpy.core.multiarray.scalar`` read pickle bytes as a pointer
(a crash at best). Anything else is refused with one line that names what was refused.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
from typing import Any

import numpy as np
import torch

# torch.serialization.MAGIC_NUMBER as the legacy container's first pickle spells it:
# PROTO 2..5, an optional protocol-4 FRAME, then LONG1 with 10 little-endian bytes.
_TORCH_LEGACY_HEADER = re.compile(rb"\A\x80[\x02-\x05](?:\x95.{8})?\x8a\x0a" +
                                  re.escape((0x1950a86a20f9469cfc6c).to_bytes(10, "little")), re.DOTALL)
# Plain numeric dtypes (numpy descr strings): bool, signed/unsigned ints, floats, complex.
_NUMERIC_DESCRS = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})
_MAX_DEPTH = 32  # containers in a weights pickle nest 2-3 deep
_MAX_NODES = 10_000_000


class ConversionError(ValueError):
    """A weights file that cannot be read, or a checkpoint that cannot be mapped faithfully; the
    message is one line that says what is wrong."""


def container(data: bytes) -> str:
    """``"torch_zip"``, ``"torch_legacy"`` or ``"pickle"``, from the first bytes of ``data``."""
    if data[:4] == b"PK\x03\x04":
        return "torch_zip"
    if _TORCH_LEGACY_HEADER.match(data[:32]):
        return "torch_legacy"
    return "pickle"


def load_tensors(data: bytes) -> Any:
    """Either torch container through ``torch.load(weights_only=True)``: tensors and plain containers only."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the file is refused (nothing ran)
        raise ConversionError(f"refused {container(data).replace('_', ' ')} file: {_torch_reason(e)}") from None


def _torch_reason(e: Exception) -> str:
    """torch's multi-paragraph refusal -> the one sentence that names what was refused."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global| Please |\n|$)", text)
    m = m or re.search(r"(Trying to load unsupported GLOBAL .*?)(?:\.?\n|$)", text)  # blocked modules (posix, ...)
    if m:  # e.g. "Unsupported global: GLOBAL posix.system"
        return m.group(1).strip().rstrip(".") + " (only tensors and plain containers are built)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return f"{type(e).__name__}: {first.split('. ')[0][:200]}"


# --------------------------------------------------------------------------- inert stand-ins


class _Refused(pickle.UnpicklingError):
    pass


class _DtypeRecord:
    """What ``numpy.dtype(descr, align, copy)`` plus its BUILD state say; builds nothing."""

    def __init__(self, *args):
        self.args, self.state = args, None

    def __setstate__(self, state):
        self.state = state

    def resolve(self) -> np.dtype:
        descr = self.args[0] if self.args else None
        if not isinstance(descr, str) or descr not in _NUMERIC_DESCRS:
            raise _Refused(f"refused numpy dtype {descr!r}: only plain numeric dtypes "
                           f"({', '.join(sorted(_NUMERIC_DESCRS))}) are accepted in a weights pickle")
        order = "="
        if self.state is not None:
            s = self.state
            if not (isinstance(s, tuple) and len(s) in (8, 9) and s[0] in (3, 4)):
                raise _Refused(f"refused numpy dtype {descr!r}: unrecognised state {str(s)[:80]}")
            if s[2] is not None or s[3] is not None or s[4] is not None:
                raise _Refused(f"refused numpy dtype {descr!r} with a subarray or fields (structured dtypes are "
                               f"not weights)")
            if s[1] not in ("<", ">", "|", "="):
                raise _Refused(f"refused numpy dtype {descr!r}: byte order {s[1]!r}")
            order = "=" if s[1] == "|" else s[1]
        # Built from the checked string alone: flags, sizes and alignment in the pickle are ignored.
        return np.dtype(descr).newbyteorder(order)


class _NdarrayName:
    """``numpy.ndarray`` may only be named as ``_reconstruct``'s first argument, never called."""

    def __init__(self, *args):
        raise _Refused("refused a call of numpy.ndarray: arrays are accepted only in numpy's own pickle form")


class _ArrayRecord:
    """An array as ``_reconstruct`` + BUILD, ``scalar`` or ``_frombuffer`` describe it; built later."""

    def __init__(self, how: str, args: tuple):
        self.how, self.args, self.state = how, args, None

    def __setstate__(self, state):
        if self.how != "_reconstruct":
            raise _Refused(f"refused state for numpy {self.how}")
        self.state = state

    def resolve(self) -> np.ndarray:
        if self.how == "_reconstruct":
            if len(self.args) != 3 or self.args[0] is not _NdarrayName:
                raise _Refused("refused numpy _reconstruct of something other than numpy.ndarray")
            s = self.state
            if isinstance(s, tuple) and len(s) == 5 and s[0] == 1:
                s = s[1:]
            if not (isinstance(s, tuple) and len(s) == 4):
                raise _Refused("refused numpy array without the (shape, dtype, fortran, bytes) state")
            shape, dtype, fortran, raw = s
            order = "F" if fortran is True else "C"
            if not isinstance(fortran, bool):
                raise _Refused(f"refused numpy array with order flag {fortran!r}")
        elif self.how == "scalar":
            if len(self.args) != 2:
                raise _Refused("refused numpy scalar with unexpected arguments")
            dtype, raw = self.args
            shape, order = (), "C"
        else:  # _frombuffer (protocol 5)
            if len(self.args) != 4:
                raise _Refused("refused numpy _frombuffer with unexpected arguments")
            raw, dtype, shape, order = self.args
            if order not in ("C", "F"):
                raise _Refused(f"refused numpy _frombuffer with order {order!r}")
        if not isinstance(dtype, _DtypeRecord):
            raise _Refused(f"refused numpy array whose dtype is a {type(dtype).__name__}")
        dt = dtype.resolve()
        if isinstance(raw, str):  # Python 2 pickles (read with encoding latin1)
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused(f"refused numpy array whose data is a {type(raw).__name__}, not bytes "
                           f"(object arrays are not weights)")
        if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
            raise _Refused(f"refused numpy array with shape {str(shape)[:80]}")
        count = math.prod(shape)
        if count * dt.itemsize != len(raw):
            raise _Refused(f"refused numpy array of shape {shape} {dt.str}: needs {count * dt.itemsize} bytes, "
                           f"the pickle holds {len(raw)}")
        flat = np.frombuffer(raw, dtype=dt, count=count) if count else np.zeros(0, dt)
        # One copy: writable, native byte order (the pickle's bytes stay untouched).
        return np.array(flat.reshape(shape, order=order), dtype=dt.newbyteorder("="), order="C")


def _reconstruct(*args):
    return _ArrayRecord("_reconstruct", args)


def _scalar(*args):
    return _ArrayRecord("scalar", args)


def _frombuffer(*args):
    return _ArrayRecord("_frombuffer", args)


def _latin1_encode(obj, encoding="utf-8", *rest):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: str -> latin-1 bytes, nothing else."""
    if isinstance(obj, str) and encoding in ("latin1", "latin-1") and not rest:
        return obj.encode("latin1")
    raise _Refused(f"refused _codecs.encode with encoding {encoding!r}")


def _empty_bytes(*args):
    """``bytes()`` as protocols 0-2 spell an empty byte string; any argument is refused."""
    if args:
        raise _Refused("refused bytes() with arguments")
    return b""


_STAND_INS = {("numpy", "dtype"): _DtypeRecord, ("numpy", "ndarray"): _NdarrayName,
              ("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): _latin1_encode,
              ("builtins", "bytes"): _empty_bytes, ("__builtin__", "bytes"): _empty_bytes}
for _core in ("numpy.core", "numpy._core"):
    _STAND_INS.update({(f"{_core}.multiarray", "_reconstruct"): _reconstruct,
                       (f"{_core}.multiarray", "scalar"): _scalar,
                       (f"{_core}.numeric", "_frombuffer"): _frombuffer})


class _InertUnpickler(pickle.Unpickler):
    """Every global resolves to a stand-in above; anything else is refused by name."""

    def find_class(self, module: str, name: str):
        try:
            return _STAND_INS[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"refused to build {module}.{name}: a weights pickle may hold only dicts, lists, "
                           f"strings, numbers and numpy arrays of plain numeric dtypes") from None

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id: not a plain numpy weights pickle")


def _materialise(obj):
    """Replace every recorded array in ``obj`` by a checked ndarray; refuse leftover stand-ins,
    cycles and nesting deeper than _MAX_DEPTH. Iterative: a crafted pickle can nest deeply."""
    done: dict[int, Any] = {}
    nodes = 0

    def leaf(x):
        if isinstance(x, _ArrayRecord):
            if id(x) not in done:
                done[id(x)] = x.resolve()
            return done[id(x)]
        if isinstance(x, (_DtypeRecord, _NdarrayName)) or x is _NdarrayName or callable(x):
            raise _Refused(f"refused a bare {getattr(x, '__name__', type(x).__name__)} outside an array")
        return x

    root = [obj]
    seen: set[int] = set()  # shared and self-containing containers are visited once
    work = [(root, 0)]
    while work:
        container_, depth = work.pop()
        if depth > _MAX_DEPTH:
            raise _Refused(f"refused containers nested deeper than {_MAX_DEPTH}")
        if id(container_) in seen:
            continue
        seen.add(id(container_))
        if isinstance(container_, dict):
            items = list(container_.items())
            for k, _ in items:
                if not isinstance(k, (str, int, float, bool, bytes, type(None))):
                    raise _Refused(f"refused a dict key of type {type(k).__name__}")
        elif isinstance(container_, list):
            items = list(enumerate(container_))
        else:
            items = []
        for k, v in items:  # tuples become lists, so that their items can be replaced in place
            nodes += 1
            if isinstance(v, tuple):
                v = container_[k] = list(v)
            if isinstance(v, (dict, list)):
                work.append((v, depth + 1))
            else:
                container_[k] = leaf(v)
        if nodes > _MAX_NODES:
            raise _Refused(f"refused a pickle with more than {_MAX_NODES} entries")
    return root[0]


def load_numpy_pickle(data: bytes) -> Any:
    """The object of a numpy pickle (detectron2 ``.pkl``), arrays built only from checked records.

    Raises ConversionError (one line) for anything but dicts, lists, tuples (returned as
    lists), strings, numbers and arrays of plain numeric dtypes; nothing in the file runs.
    """
    try:
        obj = _InertUnpickler(io.BytesIO(data), encoding="latin1").load()
        return _materialise(obj)
    except _Refused as e:
        raise ConversionError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - malformed bytes: nothing was built from them
        raise ConversionError(f"not a numpy weights pickle ({type(e).__name__}: {str(e)[:160]})") from None


def read_weights_file(data: bytes) -> Any:
    """The object in a weights file of any of the three containers (see the module docstring)."""
    if container(data) == "pickle":
        return load_numpy_pickle(data)
    return load_tensors(data)


def weights_dict(obj) -> dict:
    """The ``{name: array}`` of a loaded weights file: bare, or under ``model`` / ``state_dict``
    (``module.`` dropped); anything else is a one-line ConversionError."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"expected a dict of weights (optionally under 'model'), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, (np.ndarray, torch.Tensor))]
    if bad:
        raise ConversionError(f"{len(bad)} entries are not arrays, e.g. {str(bad[:3])[:200]}")
    for prefix in ("module.",):
        if all(str(k).startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}
