"""Weight files written by others (vlbert/model/detector/weight_files.py): every container loads what it
holds, hostile files are refused with one line and nothing in them runs, and no crafted or random
bytes crash the process.

The hostile files are made here, from the attacker's side: raw pickle opcodes naming whatever
global an attacker would name. Crafted and random inputs are read in a child process, so that a
segfault shows as a failed test (with the name of the case it died on) instead of killing pytest.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlbert.model.detector.convert import read_source
from vlbert.model.detector.weight_files import ConversionError, container, load_numpy_pickle, read_weights_file

pytestmark = [pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a raw pickle writer


class G:
    """A global as the GLOBAL opcode names it (any module, importable or not)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Call:
    """``fn(*args)`` (REDUCE), then BUILD with ``state`` when given."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state


def enc(x) -> bytes:
    if isinstance(x, G):
        return f"c{x.module}\n{x.name}\n".encode()
    if isinstance(x, Call):
        out = enc(x.fn) + enc(tuple(x.args)) + b"R"
        return out + (enc(x.state) + b"b" if x.state is not None else b"")
    if x is None:
        return b"N"
    if isinstance(x, bool):
        return b"\x88" if x else b"\x89"
    if isinstance(x, int):
        n = max(1, (x.bit_length() + 8) // 8)
        return b"\x8a" + bytes([n]) + x.to_bytes(n, "little", signed=True)
    if isinstance(x, float):
        return b"G" + struct.pack(">d", x)
    if isinstance(x, str):
        b = x.encode()
        return b"X" + len(b).to_bytes(4, "little") + b
    if isinstance(x, bytes):
        return b"B" + len(x).to_bytes(4, "little") + x
    if isinstance(x, tuple):
        return b"(" + b"".join(enc(e) for e in x) + b"t"
    if isinstance(x, dict):
        return b"}(" + b"".join(enc(k) + enc(v) for k, v in x.items()) + b"u"
    raise TypeError(type(x))


def dumps(x) -> bytes:
    return b"\x80\x03" + enc(x) + b"."


def dtype(descr, state=(3, "<", None, None, None, -1, -1, 0), core="numpy.core"):
    return Call(G("numpy", "dtype"), [descr, False, True], state)


def array(shape, dt, raw, core="numpy.core", fortran=False):
    return Call(G(f"{core}.multiarray", "_reconstruct"), [G("numpy", "ndarray"), (0,), b"b"],
                (1, shape, dt, fortran, raw))


def weights(value):
    return {"model": {"w": value}, "__author__": "attacker"}


def crafted_cases(marker: str) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the words the one-line refusal must contain)."""
    obj_dtype_no_flags = dtype("O8", (3, "|", None, None, None, 8, 8, 0))
    cases = {
        # numpy honours pickled dtype flags: an object dtype with flags cleared reads 8 bytes as a pointer.
        "object_scalar_flags_cleared": (dumps(weights(Call(G("numpy.core.multiarray", "scalar"),
                                                           [obj_dtype_no_flags, b"\x41" * 8]))), "'O8'"),
        "object_scalar_numpy2_names": (dumps(weights(Call(G("numpy._core.multiarray", "scalar"),
                                                          [obj_dtype_no_flags, b"\x00" * 8]))), "'O8'"),
        "object_array": (pickle.dumps(weights(np.array([None, 1], dtype=object)), protocol=2), "'O8'"),
        "structured_object_array": (pickle.dumps(weights(np.array([(None,)], dtype=[("a", "O")])), protocol=4),
                                    "'V8'"),
        "numeric_descr_with_fields": (dumps(weights(array((1,), dtype("f4", (3, "|", None, ("a",), {"a": ("O",)},
                                                                            8, 1, 0x3f)), b"\x00" * 4))), "fields"),
        "numeric_descr_with_subarray": (dumps(weights(array((1,), dtype("f4", (3, "<", ("O", (1,)), None, None,
                                                                               8, 8, 0)), b"\x00" * 4))), "subarray"),
        "dtype_from_tuple": (dumps(weights(array((1,), Call(G("numpy", "dtype"), [("f4", (2,)), False, True]),
                                                 b"\x00" * 8))), "refused numpy dtype"),
        "frombuffer_object_dtype": (b"\x80\x05" + enc(weights(Call(G("numpy._core.numeric", "_frombuffer"),
                                                                   [b"\x00" * 8, obj_dtype_no_flags, (1,), "C"])))
                                    + b".", "'O8'"),
        "nested_reduce": (dumps(weights(Call(G("numpy.core.multiarray", "_reconstruct"),
                                             [Call(G("numpy.core.multiarray", "_reconstruct"),
                                                   [G("numpy", "ndarray"), (0,), b"b"]), (0,), b"b"],
                                             (1, (2,), dtype("f4"), False, b"\x00" * 8)))), "other than numpy.ndarray"),
        "dtype_is_an_array": (dumps(weights(Call(G("numpy.core.multiarray", "scalar"),
                                                 [array((1,), dtype("f4"), b"\x00" * 4), b"\x00" * 4]))),
                              "whose dtype is"),
        "huge_shape_2_40": (dumps(weights(array((2 ** 40,), dtype("f8"), b"\x00" * 8))), "8796093022208 bytes"),
        "huge_shape_product": (dumps(weights(array((2 ** 31, 2 ** 31, 2 ** 31), dtype("i8"), b""))), "bytes"),
        "huge_shape_with_zero": (dumps(weights(array((0, 2 ** 62), dtype("f4"), b""))), ""),
        "negative_shape": (dumps(weights(array((-1, 2), dtype("f4"), b"\x00" * 8))), "shape"),
        "short_data": (dumps(weights(array((3,), dtype("f4"), b"\x00" * 8))), "needs 12 bytes"),
        "data_is_a_list": (dumps(weights(array((1,), dtype("f4"), (1.0,)))), "not bytes"),
        "ndarray_called": (dumps(weights(Call(G("numpy", "ndarray"), [(2,)]))), "numpy.ndarray"),
        "bare_dtype": (dumps(weights(dtype("f4"))), "refused"),
        "os_system": (dumps(weights(Call(G("os", "system"), [f"touch {marker}"]))), "os.system"),
        "posix_system": (dumps(weights(Call(G("posix", "system"), [f"touch {marker}"]))), "posix.system"),
        "builtins_eval": (dumps(weights(Call(G("builtins", "eval"), [f"open({marker!r}, 'w')"]))), "builtins.eval"),
        "builtins_open": (dumps(weights(Call(G("builtins", "open"), [marker, "w"]))), "builtins.open"),
        "builtins_getattr": (dumps(weights(Call(G("builtins", "getattr"), [G("os", "system"), "x"]))),
                             "builtins.getattr"),
        "numpy_load": (dumps(weights(Call(G("numpy", "load"), [marker]))), "numpy.load"),
        "numpy_frombuffer": (dumps(weights(Call(G("numpy", "frombuffer"), [b"\x00" * 8, "O"]))), "numpy.frombuffer"),
        "torch_rebuild": (dumps(weights(Call(G("torch._utils", "_rebuild_tensor_v2"), [1]))), "torch._utils"),
        "codecs_other_encoding": (dumps(weights(Call(G("_codecs", "encode"), ["x", "rot13"]))), "rot13"),
        "bytes_with_argument": (dumps(weights(Call(G("builtins", "bytes"), [2 ** 40]))), "bytes()"),
        "persistent_id": (b"\x80\x03X\x01\x00\x00\x00aQ.", "persistent id"),
        "out_of_band_buffer": (b"\x80\x05\x97.", "not a numpy weights pickle"),
        "declared_length_past_end": (b"\x80\x03B\xff\xff\xff\x7f" + b"x" * 16, "not a numpy weights pickle"),
        "deep_nesting": (b"\x80\x02" + b"(" * 50_000 + b"t" * 50_000 + b".", "nested deeper"),
        # {"model": d} where d holds itself: must end (refused: its entries are not arrays).
        "self_containing_dict": (b"\x80\x02}q\x00(X\x05\x00\x00\x00model}q\x01X\x01\x00\x00\x00wh\x01su.",
                                 "not arrays"),
    }
    return cases


# The child loads weight_files.py alone (torch and numpy, not the detector package's mmdet).
CHILD = r"""
import importlib.util, json, sys
from pathlib import Path
import numpy as np
spec = importlib.util.spec_from_file_location("weight_files", sys.argv[2])
wf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wf)
ConversionError = wf.ConversionError
read_source = lambda data: wf.weights_dict(wf.read_weights_file(data))
for path in sorted(Path(sys.argv[1]).iterdir()):
    print("CASE", path.name, flush=True)
    try:
        w = read_source(path.read_bytes())
    except ConversionError as e:
        print("REFUSED", json.dumps(str(e)), flush=True)
        continue
    except BaseException as e:
        print("ESCAPED", json.dumps(f"{type(e).__name__}: {e}"), flush=True)
        continue
    ok = all(isinstance(v, (np.ndarray,)) and v.dtype.kind in "biufc" and v.dtype.fields is None
             or type(v).__name__ == "Tensor" for v in w.values())
    print("LOADED", json.dumps({"arrays": len(w), "plain_numeric": ok}), flush=True)
print("DONE", flush=True)
"""


def run_child(folder: Path) -> dict[str, tuple[str, str]]:
    """Read every file in ``folder`` in a fresh interpreter -> name -> (outcome, detail)."""
    module = REPO / "vlbert" / "model" / "detector" / "weight_files.py"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(module)], capture_output=True, text=True,
                          timeout=240, cwd=folder.parent)
    results, name = {}, None
    for line in proc.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "CASE":
            name = rest
        elif tag in ("REFUSED", "LOADED", "ESCAPED"):
            results[name] = (tag, json.loads(rest) if tag != "LOADED" else rest)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("DONE"), (
        f"reader process died (exit {proc.returncode}) on case {name!r}: {proc.stderr[-2000:]}")
    return results


# --------------------------------------------------------------------------- tests


def test_numpy_pickles_of_every_protocol_load_exactly():
    """Arrays come back equal to numpy's own pickled arrays, for protocols 0-5 (Python 2 era to the
    out-of-band form), big-endian, Fortran-ordered, empty and scalar values. Fails if the Fortran
    flag or the byte order in the record were ignored (checked by breaking ``order`` to "C")."""
    src = {"f4_big_endian": np.arange(6, dtype=">f4").reshape(2, 3), "f8_fortran": np.asfortranarray(
        np.arange(12.0).reshape(3, 4)), "i8_empty": np.zeros((0, 4), np.int64), "u1": np.arange(7, dtype=np.uint8),
        "b1": np.array([True, False, True]), "c8": np.array([1 + 2j], np.complex64), "f2": np.ones(3, np.float16),
        "scalar": np.float64(2.5)}
    for protocol in range(6):
        got = load_numpy_pickle(pickle.dumps({"model": src, "__author__": "x"}, protocol=protocol))["model"]
        assert sorted(got) == sorted(src)
        for k, v in src.items():
            assert got[k].shape == np.shape(v) and got[k].dtype == np.asarray(v).dtype.newbyteorder("="), (protocol, k)
            np.testing.assert_array_equal(got[k], v)
            assert got[k].flags.writeable


def test_container_is_told_by_its_bytes_not_its_name(tmp_path):
    """A legacy torch file named .pkl and a numpy pickle named .pth both load; torch's legacy
    header is recognised with torch's default pickle protocol 2 and with a framed protocol 4
    (which torch's weights_only reader itself refuses: one line). Fails if the reader went by the
    file name or only recognised the zip's 'PK' (the legacy file then reaches the numpy reader
    and is refused: "expected a dict of weights ..., got int")."""
    t = {"conv1.weight": torch.randn(4, 3, 1, 1), "bn1.num_batches_tracked": torch.tensor(7)}
    buf = io.BytesIO()
    torch.save(t, buf, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.pkl").write_bytes(buf.getvalue())
    data = (tmp_path / "legacy.pkl").read_bytes()
    assert container(data) == "torch_legacy"
    got = read_source(data)
    assert torch.equal(got["conv1.weight"], t["conv1.weight"]) and int(got["bn1.num_batches_tracked"]) == 7
    buf = io.BytesIO()
    torch.save(t, buf, _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert container(buf.getvalue()) == "torch_legacy"
    with pytest.raises(ConversionError, match=r"^refused torch legacy file: Unsupported operand 149"):
        read_source(buf.getvalue())
    buf = io.BytesIO()
    torch.save(t, buf)
    assert container(buf.getvalue()) == "torch_zip"
    (tmp_path / "d2.pth").write_bytes(pickle.dumps({"model": {"a": np.ones(2, np.float32)}, "__author__": "x"}))
    data = (tmp_path / "d2.pth").read_bytes()
    assert container(data) == "pickle" and read_source(data)["a"].tolist() == [1.0, 1.0]


class _Payload:
    """Pickles as ``fn(*args)``: what an attacker's object reduces to."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("holder", ["numpy_pickle", "torch_legacy", "torch_zip"])
def test_hostile_pickles_are_refused_in_every_container_and_nothing_runs(holder, tmp_path):
    """A payload that would create a marker file if executed (builtins.open, builtins.eval,
    os.system), inside a state dict in each container: refused with one line naming the global,
    and the marker never appears. Fails if the numpy reader allowed a builtin (checked by adding
    ("io", "open") to its stand-ins: the file is opened, and the refusal no longer names it)."""
    marker = tmp_path / "marker"
    for fn, args, name in ((open, (str(marker), "w"), "open"), (eval, (f"open({str(marker)!r}, 'w')",), "eval"),
                           (os.system, (f"touch {marker}",), "system")):
        obj = {"model": {"conv1.weight": torch.ones(2) if holder != "numpy_pickle" else np.ones(2, np.float32),
                         "evil": _Payload(fn, *args)}}
        if holder == "numpy_pickle":
            data = pickle.dumps(obj, protocol=2)
        else:
            buf = io.BytesIO()
            torch.save(obj, buf, _use_new_zipfile_serialization=holder == "torch_zip")
            data = buf.getvalue()
        with pytest.raises(ConversionError) as err:
            read_source(data)
        msg = str(err.value)
        assert "\n" not in msg and name in msg and "refused" in msg, msg
        assert not marker.exists(), f"{fn} ran while reading a {holder}"


def test_crafted_pickles_are_refused_without_crashing(tmp_path):
    """Object dtypes with flags cleared fed to numpy's scalar, structured and subarray dtypes,
    nested reduce, declared shapes of 2^40 elements and more, unknown globals (os.system,
    builtins.eval, ...), persistent ids, deep nesting and a self-containing dict: each is read in a
    child process and refused with one line that names it; nothing runs (no marker file). Fails
    on the previous reader (numpy's own dtype/scalar: the child dies with SIGSEGV on
    object_scalar_flags_cleared, exit -11) and if the size check is removed (huge_shape_2_40 is
    then refused by numpy's frombuffer with a message that does not say what was declared)."""
    marker = tmp_path / "marker"
    cases = crafted_cases(str(marker))
    folder = tmp_path / "cases"
    folder.mkdir()
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    results = run_child(folder)
    assert sorted(results) == sorted(cases)
    for name, (_, words) in cases.items():
        outcome, detail = results[name]
        assert outcome == "REFUSED", (name, outcome, detail)
        assert "\n" not in detail and words in detail, (name, detail)
    assert not marker.exists()


def test_fuzz_random_and_mutated_bytes_never_crash(tmp_path):
    """300 inputs: random byte strings (some behind a pickle protocol header) and a valid weights
    pickle / legacy torch file with 1-3 bytes changed or cut short. In a child process: it must
    not die, nothing may escape as another exception type, random bytes are all refused, and
    whatever loads is a dict of plain numeric arrays. Fails if the reader let a non-ConversionError
    escape (checked by narrowing load_numpy_pickle's except to UnpicklingError: mutated strings come
    back ESCAPED as UnicodeDecodeError)."""
    rng = np.random.default_rng(0)
    good = pickle.dumps({"model": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)},
                         "__author__": "x"}, protocol=2)
    buf = io.BytesIO()
    torch.save({"a": torch.arange(6.0)}, buf, _use_new_zipfile_serialization=False)
    legacy = buf.getvalue()
    folder = tmp_path / "fuzz"
    folder.mkdir()
    for i in range(100):
        head = [b"", b"\x80\x02", b"\x80\x04", b"\x80\x05"][i % 4]
        (folder / f"random-{i:03d}").write_bytes(head + rng.integers(0, 256, int(rng.integers(0, 300)),
                                                                     dtype=np.uint8).tobytes())
    for i in range(200):
        src = bytearray(good if i % 4 else legacy)
        if i % 7 == 0:
            src = src[: int(rng.integers(1, len(src)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                src[int(rng.integers(0, len(src)))] = int(rng.integers(0, 256))
        (folder / f"mutated-{i:03d}").write_bytes(bytes(src))
    results = run_child(folder)
    assert len(results) == 300
    escaped = {k: v for k, v in results.items() if v[0] == "ESCAPED"}
    assert not escaped, escaped
    assert all(results[f"random-{i:03d}"][0] == "REFUSED" for i in range(100))
    loaded = [v for v in results.values() if v[0] == "LOADED"]
    assert all(json.loads(v[1])["plain_numeric"] for v in loaded), loaded
    print(f"fuzz: {len(loaded)} mutated files still loaded (all plain numeric), {300 - len(loaded)} refused")


def test_refusal_names_what_was_refused():
    """The message is one line that names the global or the dtype (the CLI prints it after the path)."""
    with pytest.raises(ConversionError, match=r"^refused to build posix\.system: a weights pickle may hold only"):
        read_weights_file(dumps(weights(Call(G("posix", "system"), ["true"]))))
    with pytest.raises(ConversionError, match=r"^refused numpy dtype 'O8'"):
        read_weights_file(pickle.dumps(np.array([None], dtype=object)))
