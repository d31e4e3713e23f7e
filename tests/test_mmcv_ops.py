"""mmcv's compiled ops as installed (scripts/mmcv_build.sh compiles only those vlbert calls; docs/install.md).

- RoIAlign (aligned and legacy, adaptive and one sample per bin: the default and butd_r101_vg layouts),
  NMS and batched NMS give the outputs and input gradients of independent implementations written here
  from the ops' published definitions (torchvision's roi_align/nms kernels, Detectron's RoIAlign). The
  references are ours, not torchvision's: PyPI's torchvision wheels are CUDA builds that do not load beside
  the CPU torch. RoIPool has CUDA kernels only (vlbert's CaffeRoIPool runs on the CPU): on the CPU it is
  checked to be compiled, on CUDA against its definition.
- every function the detector paths call (scripts/mmcv_ops_trace.py) is compiled, not a stub;
- in a subset build, a function outside it raises "not built in this install: <function>" (skipped, with
  the reason, when the installed mmcv is a full build: then there is no such function);
- the op list (scripts/patches/mmcv-2.1.0-ops.txt) names sources, .cu included, that exist in mmcv's source,
  and the patch's binding filter keeps exactly those ops' Python functions and CUDA registrations (needs
  the source archive that scripts/env.sh keeps in VLBERT_CACHE; skipped without it).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from mmcv.ops import batched_nms, nms, roi_align, roi_pool
from mmcv.utils import ext_loader

ROOT = Path(__file__).resolve().parents[1]
OPS_FILE = ROOT / "scripts" / "patches" / "mmcv-2.1.0-ops.txt"
# What vlbert's detector paths call (scripts/mmcv_ops_trace.py, recorded in docs/install.md).
NEEDED = ("nms", "roi_align_forward", "roi_align_backward", "roi_pool_forward", "roi_pool_backward")


def _ext():
    import mmcv._ext
    return mmcv._ext


def _subset_ops():
    """The ops of a subset build, None for a full build."""
    return getattr(_ext(), "__vlbert_ops__", None)


# --------------------------------------------------------------------------- references


def ref_roi_align(feat, rois, size, scale, sampling_ratio, aligned):
    """RoIAlign by its definition, as separable bilinear weights: out = Wy @ f @ Wx^T, averaged per bin.

    Sample points: bin start + (i + 0.5) * bin / grid, grid = sampling_ratio or ceil(roi / size); the
    box shifted by -0.5 when ``aligned``, else at least 1 pixel. A sample outside [-1, H] x [-1, W] counts 0;
    inside, coordinates below 0 are 0, and at or past the last row/column the sample takes that row/column.
    """
    _, C, H, W = feat.shape
    out = []

    def weights(coords, n):  # [S] sample coordinates -> [S, n] bilinear weights
        w = feat.new_zeros(len(coords), n)
        for s, v in enumerate(coords.tolist()):
            if v < -1.0 or v > n:
                continue
            v = max(v, 0.0)
            lo = int(math.floor(v))
            if lo >= n - 1:
                w[s, n - 1] = 1.0
                continue
            w[s, lo] += 1 - (v - lo)
            w[s, lo + 1] += v - lo
        return w

    for b, x1, y1, x2, y2 in rois.tolist():
        off = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (v * scale - off for v in (x1, y1, x2, y2))
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / size)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / size)
        ys = torch.tensor([y1 + (p + (i + 0.5) / gh) * rh / size for p in range(size) for i in range(gh)],
                          dtype=torch.float64)
        xs = torch.tensor([x1 + (p + (i + 0.5) / gw) * rw / size for p in range(size) for i in range(gw)],
                          dtype=torch.float64)
        samples = weights(ys, H) @ feat[int(b)] @ weights(xs, W).T  # [C, size*gh, size*gw]
        out.append(samples.view(C, size, gh, size, gw).mean((2, 4)))
    return torch.stack(out)


def ref_roi_pool(feat, rois, size, scale):
    """mmcv's RoIPool by its kernel's definition (mmcv/ops/csrc/common/cuda/roi_pool_cuda_kernel.cuh): the box
    x1 * scale .. (x2 + 1) * scale unrounded, bins floor(start) .. ceil(end) clipped to the map, max, 0 if empty."""
    _, C, H, W = feat.shape
    out = feat.new_zeros(len(rois), C, size, size)
    for n, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = x1 * scale, y1 * scale, (x2 + 1) * scale, (y2 + 1) * scale
        bw, bh = (x2 - x1) / size, (y2 - y1) / size
        for i in range(size):
            h0, h1 = (min(max(v, 0), H) for v in (math.floor(i * bh + y1), math.ceil((i + 1) * bh + y1)))
            for j in range(size):
                w0, w1 = (min(max(v, 0), W) for v in (math.floor(j * bw + x1), math.ceil((j + 1) * bw + x1)))
                if h1 > h0 and w1 > w0:
                    out[n, :, i, j] = feat[int(b), :, h0:h1, w0:w1].amax((-2, -1))
    return out


def ref_nms(boxes, scores, thr):
    """Greedy NMS: indices by descending score, a box dropped when its IoU with a kept one exceeds ``thr``."""
    keep = []
    for i in sorted(range(len(boxes)), key=lambda i: -float(scores[i])):
        bx = boxes[i].tolist()
        ok = True
        for k in keep:
            kx = boxes[k].tolist()
            iw = max(0.0, min(bx[2], kx[2]) - max(bx[0], kx[0]))
            ih = max(0.0, min(bx[3], kx[3]) - max(bx[1], kx[1]))
            inter = iw * ih
            union = (bx[2] - bx[0]) * (bx[3] - bx[1]) + (kx[2] - kx[0]) * (kx[3] - kx[1]) - inter
            if inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def random_boxes(n, size, g):
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], 1)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("aligned,sampling_ratio,size", [(True, 0, 14), (False, 1, 14), (False, 0, 7), (True, 2, 7)])
def test_roi_align_matches_its_definition_forward_and_backward(aligned, sampling_ratio, size):
    """(True, 0): the default layout; (False, 1): butd_r101_vg. Fails if the kernel's sampling grid, the
    half-pixel shift or its gradient differ (checked by swapping ``aligned`` in the mmcv call: all fail)."""
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 3, 12, 15, generator=g, dtype=torch.float64)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0]]),
                      torch.tensor([[0, 0, 239, 191], [20.3, 30.1, 100.7, 150.2], [-30, -10, 60, 40],
                                    [150, 100, 260, 220], [40, 40, 41, 42]])], 1)
    want_in = feat.clone().requires_grad_(True)
    want = ref_roi_align(want_in, rois, size, 1 / 16, sampling_ratio, aligned)
    got_in = feat.float().requires_grad_(True)
    got = roi_align(got_in, rois.float(), (size, size), 1 / 16, sampling_ratio, "avg", aligned)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (want * grad_out).sum().backward()
    (got * grad_out.float()).sum().backward()
    torch.testing.assert_close(got_in.grad.double(), want_in.grad, rtol=1e-5, atol=1e-5)


def test_nms_matches_greedy_definition():
    """Fails if the kernel keeps or orders boxes otherwise (checked with the threshold changed to 0.3)."""
    g = torch.Generator().manual_seed(2)
    boxes, scores = random_boxes(200, 60, g), torch.rand(200, generator=g)
    for thr in (0.3, 0.5, 0.7):
        dets, keep = nms(boxes, scores, thr)
        assert keep.tolist() == ref_nms(boxes, scores, thr)
        torch.testing.assert_close(dets, torch.cat([boxes[keep], scores[keep, None]], 1))


def test_batched_nms_is_nms_per_class():
    """Per-class NMS, merged by score: the detector's RPN and per-class region selection. Fails if boxes of
    different classes suppress each other (checked with every class set to 0)."""
    g = torch.Generator().manual_seed(3)
    boxes, scores = random_boxes(150, 40, g), torch.rand(150, generator=g)
    classes = torch.randint(0, 4, (150,), generator=g)
    _, keep = batched_nms(boxes, scores, classes, dict(type="nms", iou_threshold=0.4))
    want = []
    for c in range(4):
        idx = (classes == c).nonzero().flatten()
        want += [int(idx[i]) for i in ref_nms(boxes[idx], scores[idx], 0.4)]
    want.sort(key=lambda i: -float(scores[i]))
    assert keep.tolist() == want
    assert len(set(classes[keep].tolist())) == 4


def test_roi_pool_is_compiled_with_cuda_kernels_only():
    """mmcv's RoIPool has no CPU kernel: on the CPU the compiled function exists and its dispatcher says so
    (a stub would say "not built in this install"). Fails if roi_pool is left out of the op list."""
    feat, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 0, 0, 64, 64]])
    with pytest.raises(Exception) as err:
        roi_pool(feat, rois, (2, 2), 1 / 16)
    assert "not built in this install" not in str(err.value)
    assert "cpu" in str(err.value).lower(), str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mmcv's RoIPool kernels are CUDA only; no CUDA here")
def test_roi_pool_matches_its_definition_on_cuda():
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(2, 3, 12, 15, generator=g)
    rois = torch.tensor([[0, 0, 0, 239, 191], [1, 20.3, 30.1, 100.7, 150.2], [1, -30, -10, 60, 40]])
    got_in = feat.cuda().requires_grad_(True)
    got = roi_pool(got_in, rois.cuda(), (7, 7), 1 / 16)
    want_in = feat.clone().requires_grad_(True)
    want = ref_roi_pool(want_in, rois, 7, 1 / 16)
    torch.testing.assert_close(got.cpu(), want)
    grad_out = torch.randn(got.shape, generator=g)
    (got * grad_out.cuda()).sum().backward()
    (want * grad_out).sum().backward()
    torch.testing.assert_close(got_in.grad.cpu(), want_in.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here: the CUDA kernels cannot run")
def test_cuda_roi_align_and_nms_match_the_definitions():
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(2, 3, 12, 15, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 0, 0, 239, 191], [1, 20.3, 30.1, 100.7, 150.2], [1, -30, -10, 60, 40]])
    for aligned, ratio in ((True, 0), (False, 1)):
        want_in = feat.clone().requires_grad_(True)
        want = ref_roi_align(want_in, rois.double(), 14, 1 / 16, ratio, aligned)
        got_in = feat.float().cuda().requires_grad_(True)
        got = roi_align(got_in, rois.cuda(), (14, 14), 1 / 16, ratio, "avg", aligned)
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
        grad_out = torch.randn(got.shape, generator=g, dtype=torch.float64)
        (want * grad_out).sum().backward()
        (got * grad_out.float().cuda()).sum().backward()
        torch.testing.assert_close(got_in.grad.double().cpu(), want_in.grad, rtol=1e-5, atol=1e-5)
    boxes, scores = random_boxes(300, 60, g), torch.rand(300, generator=g)
    classes = torch.randint(0, 4, (300,), generator=g)
    assert nms(boxes.cuda(), scores.cuda(), 0.5)[1].tolist() == ref_nms(boxes, scores, 0.5)
    cfg = dict(type="nms", iou_threshold=0.4)
    assert (batched_nms(boxes.cuda(), scores.cuda(), classes.cuda(), cfg)[1].tolist()
            == batched_nms(boxes, scores, classes, cfg)[1].tolist())


# --------------------------------------------------------------------------- the built set


def test_every_function_the_detector_calls_is_compiled():
    """Fails if an op the trace found is missing or only a stub (checked by deleting roi_align from the op
    list and rebuilding: roi_align_forward/backward became stubs)."""
    ext = _ext()
    stubs = getattr(ext_loader, "NOT_BUILT", set())
    assert [f for f in NEEDED if not hasattr(ext, f) or f in stubs] == []


def test_a_function_outside_the_build_says_it_is_not_built():
    """Fails if the subset build's stubs are missing (mmcv.ops would not import) or say something else."""
    ops = _subset_ops()
    if ops is None:
        pytest.skip("the installed mmcv is a full build (every op compiled, e.g. a VLBERT_WHEELS wheel): "
                    "no function is outside it")
    from mmcv.ops import box_iou_rotated, sigmoid_focal_loss
    assert set(ops) == set(read_ops())
    assert {"box_iou_rotated", "sigmoid_focal_loss_forward"} <= ext_loader.NOT_BUILT
    with pytest.raises(NotImplementedError, match=r"^not built in this install: box_iou_rotated \("):
        box_iou_rotated(torch.zeros(2, 5), torch.zeros(3, 5))
    with pytest.raises(NotImplementedError, match="not built in this install: sigmoid_focal_loss_forward"):
        sigmoid_focal_loss(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 2.0, 0.25)


# --------------------------------------------------------------------------- the op list and the patch


def read_ops() -> dict[str, list[str]]:
    ops = {}
    for line in OPS_FILE.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            ops[words[0]] = words[1:]
    return ops


def test_op_list_gives_each_op_a_cpu_dispatcher_and_a_cuda_kernel():
    """Each op: its dispatcher pytorch/<op>.cpp and a CUDA kernel, so CPU and GPU builds cover it (the
    GPU kit compiles the same list); CPU kernels where mmcv has one (RoIPool has none)."""
    ops = read_ops()
    assert set(ops) == {"nms", "roi_align", "roi_pool"}
    for op, files in ops.items():
        assert f"{op}.cpp" in files, op
        assert [f for f in files if f.startswith("cuda/") and f.endswith(".cu")], op
    assert "cpu/nms.cpp" in ops["nms"] and "cpu/roi_align.cpp" in ops["roi_align"]


def _sdist() -> Path:
    cache = Path(os.environ.get("VLBERT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "vlbert")
    for p in (cache / "mmcv-2.1.0.tar.gz", ROOT / ".gpu_kit" / "sdist" / "mmcv-2.1.0.tar.gz"):
        if p.is_file():
            return p
    pytest.skip(f"no mmcv 2.1.0 source archive in {cache} or .gpu_kit/sdist (scripts/env.sh keeps the one it "
                f"compiles; a venv with mmcv installed otherwise never fetched it)")


@pytest.fixture(scope="module")
def patched_source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmcv-src")
    with tarfile.open(_sdist()) as t:
        t.extractall(tmp, filter="data")
    src = tmp / "mmcv-2.1.0"
    for p in sorted((ROOT / "scripts" / "patches").glob("mmcv-2.1.0-*.patch")):
        out = subprocess.run(["patch", "-d", str(src), "-p1", "--forward"], stdin=p.open(), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    return src


def _subset(src: Path, ops_text: str, monkeypatch):
    """Run the patch's source filter (vlbert_subset.py) in ``src`` on the CUDA build's source list, as
    setup.py does: (kept sources, pybind_subset.cpp, cudabind_subset.cpp)."""
    import importlib.util
    (src / "vlbert_ops.txt").write_text(ops_text)
    spec = importlib.util.spec_from_file_location("vlbert_subset", src / "vlbert_subset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(src)
    pt = Path("mmcv/ops/csrc/pytorch")
    files = [f"./{p}" for p in sorted(pt.glob("*.cpp")) + sorted(pt.glob("cpu/*.cpp")) + sorted(pt.glob("cuda/*.cu"))
             + sorted(pt.glob("cuda/*.cpp"))]  # the CUDA branch of setup.py globs these
    kept = module.subset_sources(files, "vlbert_ops.txt")
    return kept, (pt / "pybind_subset.cpp").read_text(), (pt / "cuda" / "cudabind_subset.cpp").read_text()


def defined(cpp: str) -> list[str]:
    """Names of the functions C++ text defines: a name, a parameter list, then a body."""
    return re.findall(r"(\w+)\s*\([^;{}]*\)\s*\{", cpp)


def test_op_list_sources_exist_and_the_cuda_binding_keeps_exactly_these_ops(patched_source, monkeypatch):
    """The CUDA build's source list and bindings for our op list. Fails if the filter drops a registration
    of a built op or keeps one of another (checked by keeping every item in subset_cudabind: every op's
    registration appeared) or keeps a definition whose launcher is not compiled (checked by ignoring the
    REGISTER_DEVICE_IMPL lines that lack a ';': min_area_polygons_cuda and indice_conv_forward_cuda appeared)."""
    pt = patched_source / "mmcv" / "ops" / "csrc" / "pytorch"
    ops = read_ops()
    for files in ops.values():
        for f in files:
            assert (pt / f).is_file(), f
    kept, pybind, cudabind = _subset(patched_source, OPS_FILE.read_text(), monkeypatch)
    listed = {f"./mmcv/ops/csrc/pytorch/{f}" for files in ops.values() for f in files}
    assert set(kept) == listed | {"./mmcv/ops/csrc/pytorch/pybind_subset.cpp",
                                  "./mmcv/ops/csrc/pytorch/cuda/cudabind_subset.cpp"}
    registered = set(re.findall(r"REGISTER_DEVICE_IMPL\(\s*(\w+)", cudabind))
    assert registered == {"nms_impl", "roi_align_forward_impl", "roi_align_backward_impl",
                          "roi_pool_forward_impl", "roi_pool_backward_impl"}
    # The functions cudabind defines (a body), each calling its op's CUDA launcher: another op's would not link.
    assert set(defined(cudabind)) == {"nms_cuda", "roi_align_forward_cuda", "roi_align_backward_cuda",
                                      "roi_pool_forward_cuda", "roi_pool_backward_cuda"}
    bound = set(re.findall(r'm\.def\("(\w+)"', pybind))
    # nms.cpp also defines softnms and nms_match: compiled with it, so bound.
    assert bound == set(NEEDED) | {"softnms", "nms_match"}
    assert 'm.attr("__vlbert_ops__") = py::make_tuple("nms", "roi_align", "roi_pool")' in pybind


def test_filter_with_every_source_keeps_every_binding(patched_source, monkeypatch):
    """With every op listed the filter must keep all of mmcv's bindings (counted in the original files), so
    it only ever drops what is not compiled. Fails if a binding is misparsed."""
    pt = patched_source / "mmcv" / "ops" / "csrc" / "pytorch"
    every = [p.relative_to(pt).as_posix() for p in sorted(pt.glob("*.cpp")) + sorted(pt.glob("cpu/*.cpp"))
             + sorted(pt.glob("cuda/*.cu")) if "pybind" not in p.name]
    _, pybind, cudabind = _subset(patched_source, "all_ops " + " ".join(every) + "\n", monkeypatch)
    original_pybind = (pt / "pybind.cpp").read_text()
    original_cudabind = (pt / "cuda" / "cudabind.cpp").read_text()
    assert re.findall(r'm\.def\("(\w+)"', pybind) == re.findall(r'm\.def\("(\w+)"', original_pybind)
    assert (re.findall(r"REGISTER_DEVICE_IMPL\(\s*(\w+)", cudabind)
            == re.findall(r"REGISTER_DEVICE_IMPL\(\s*(\w+)", original_cudabind))
    assert defined(cudabind) == defined(original_cudabind) and len(defined(cudabind)) > 80
    assert len(re.findall(r"REGISTER_DEVICE_IMPL\(", original_cudabind)) > 90
