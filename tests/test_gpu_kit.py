"""The GPU kit (scripts/gpu_kit*.sh, scripts/gpu_kit.py): what can be checked without a GPU or the network.

- the committed lock (scripts/gpu_kit.lock) agrees with setup.py's pins and leaves to the host only what
  scripts/gpu_kit_host.txt says it has;
- the requirement check finds what a kit lacks (on wheels made here);
- the shell scripts parse (bash -n);
- the run script installs a kit into a target folder and takes a carried mmcv instead of compiling (a
  kit of small wheels made here, so nothing is downloaded);
- when a gathered kit is present (bash scripts/gpu_kit_gather.sh), it is complete, its pure-Python
  wheels install into a target folder and our mmcv patches apply to its mmcv source; otherwise those
  tests are skipped, and say so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu_kit"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kit = _load("gpu_kit", ROOT / "scripts" / "gpu_kit.py")


def make_wheel(folder: Path, name: str, version: str, requires=(), files=None, tag="py3-none-any") -> Path:
    """A minimal valid wheel: ``files`` (path -> text) plus its dist-info."""
    files = files or {f"{name}/__init__.py": f"VERSION = {version!r}\n"}
    dist = f"{name}-{version}.dist-info"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
                   + [f"Requires-Dist: {r}\n" for r in requires])
    files = dict(files, **{f"{dist}/METADATA": meta,
                           f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"})
    files[f"{dist}/RECORD"] = "".join(f"{p},," + "\n" for p in list(files) + [f"{dist}/RECORD"])
    path = folder / f"{name}-{version}-{tag}.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
    return path


# --------------------------------------------------------------------------- the lock


def test_lock_agrees_with_setup_pins_and_the_host_list():
    lock, (host, alias) = kit.read_lock(), kit.read_host()
    assert kit.pin_problems(lock) == []
    assert lock["deepspeed"].kind == "build" and lock["mmcv"].kind == "sdist"
    for name in ("mmdet", "mmengine", "mlflow-skinny", "pydantic", "zstandard"):
        assert lock[name].kind == "wheel", name
    assert not set(lock) & (set(host) | set(alias)), "the kit carries something the host has"
    assert host["torch"] == "2.11.0" and "opencv-python" in alias


def test_pin_check_reports_a_version_setup_py_refuses():
    lock = kit.read_lock()
    lock["mmdet"] = kit.Entry("mmdet", "3.2.0", "wheel")
    lock["mmcv"] = kit.Entry("mmcv", "2.2.0", "sdist")
    problems = kit.pin_problems(lock)
    assert any("mmdet==3.3.0" in p and "3.2.0" in p for p in problems), problems
    assert any("mmcv" in p and "2.2.0" in p for p in problems), problems
    del lock["pydantic"]  # deepspeed needs it and the host lacks it
    assert any(p.startswith("deepspeed needs pydantic") for p in kit.pin_problems(lock))


def test_kit_check_finds_missing_and_unmet_requirements(tmp_path):
    wheels = tmp_path / "kit" / "wheels"
    make_wheel(wheels, "alpha", "1.0", requires=["beta>=2", "numpy>=99", "nowhere", "winonly; sys_platform == 'win32'",
                                                 "scipy", "opencv-python>=3", "extraonly; extra == 'dev'"])
    make_wheel(wheels, "beta", "1.5")
    make_wheel(wheels, "stray", "0.1")
    make_wheel(wheels, "gamma", "1.0", tag="cp313-cp313-manylinux_2_17_x86_64")
    lock = {n: kit.Entry(n, v, "wheel") for n, v in (("alpha", "1.0"), ("beta", "1.5"), ("gamma", "1.0"),
                                                      ("delta", "3.0"))}
    problems = kit.check_kit(tmp_path / "kit", lock)
    expected = [
        "delta==3.0 (wheel) is missing",
        "gamma-1.0-cp313-cp313-manylinux_2_17_x86_64.whl does not install on CPython 3.12",
        "stray-0.1-py3-none-any.whl is in the kit but not in the lock",
        "needs beta>=2, the kit has beta==1.5",
        "needs numpy>=99, the host has numpy==2.5.2",
        "needs nowhere: neither the kit nor the host has it",
    ]
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected), problems  # scipy, opencv-python (alias), win32 and extras are met


# --------------------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", ["gpu_kit_gather.sh", "gpu_kit_run.sh", "mmcv_build.sh"])
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def _run_kit(kit_dir: Path, out: Path, target: Path, stages: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KIT_PY=sys.executable, KIT_TARGET=str(target), KIT_DEVICE="cpu")
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_kit_run.sh"), str(kit_dir), str(out), stages],
                          env=env, capture_output=True, text=True, timeout=240)


def test_run_script_installs_the_kit_and_takes_a_carried_mmcv(tmp_path):
    wheels = tmp_path / "kit" / "wheels"
    make_wheel(wheels, "kitprobe", "1.2", files={"kitprobe/__init__.py": "VALUE = 42\n"})
    # A stand-in mmcv whose ops import: the run script must find it in the target and build nothing.
    make_wheel(wheels, "mmcv", "2.1.0", files={"mmcv/__init__.py": "__version__ = '2.1.0'\nFAKE = True\n",
                                               "mmcv/ops/__init__.py": ""})
    out, target = tmp_path / "out", tmp_path / "site"
    proc = _run_kit(tmp_path / "kit", out, target, "install,mmcv")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = json.loads((out / "install.json").read_text())
    assert installed["rc"] == 0 and installed["wheels"] == 2
    mmcv = json.loads((out / "mmcv_build.json").read_text())
    assert mmcv["built"] is False and Path(mmcv["mmcv_file"]).is_relative_to(target)
    probe = subprocess.run([sys.executable, "-c", "import kitprobe, mmcv; print(kitprobe.VALUE, mmcv.FAKE)"],
                           env=dict(os.environ, PYTHONPATH=str(target)), capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["42", "True"], probe.stderr
    assert "installing 2 wheels" in (out / "run.log").read_text()


def test_run_script_refuses_an_empty_kit(tmp_path):
    (tmp_path / "kit" / "wheels").mkdir(parents=True)
    proc = _run_kit(tmp_path / "kit", tmp_path / "out", tmp_path / "site", "install")
    assert proc.returncode == 1 and "no wheels in" in proc.stdout


# --------------------------------------------------------------------------- a gathered kit


@pytest.mark.skipif(not (KIT / "wheels").is_dir(), reason="no gathered kit: run bash scripts/gpu_kit_gather.sh")
def test_gathered_kit_is_complete_and_its_pure_python_wheels_install(tmp_path):
    assert kit.check_kit(KIT) == []
    pure = sorted(p for p in (KIT / "wheels").glob("*.whl") if p.name.endswith("-none-any.whl"))
    assert {"deepspeed", "mmdet", "mmengine", "mlflow-skinny"} <= {kit.kit_files(KIT)[n].name.split("-")[0]
                                                                   .replace("_", "-") for n in kit.kit_files(KIT)}
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(target), *map(str, pure)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_infos = {p.name.split("-")[0].lower().replace("_", "-") for p in target.glob("*.dist-info")}
    assert len(dist_infos) == len(pure)
    assert {"deepspeed", "mmdet", "mmengine", "mlflow-skinny"} <= dist_infos


@pytest.mark.skipif(not (KIT / "sdist").is_dir(), reason="no gathered kit: run bash scripts/gpu_kit_gather.sh")
def test_mmcv_patches_apply_to_the_gathered_source(tmp_path):
    import tarfile
    (sdist,) = (KIT / "sdist").glob("mmcv-2.1.0.tar.gz")
    with tarfile.open(sdist) as t:
        t.extractall(tmp_path, filter="data")
    src = tmp_path / "mmcv-2.1.0"
    patches = sorted((ROOT / "scripts" / "patches").glob("mmcv-2.1.0-*.patch"))
    assert patches
    for p in patches:
        out = subprocess.run(["patch", "-d", str(src), "-p1", "--forward"], stdin=p.open(), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    setup = (src / "setup.py").read_text()
    assert "pkg_resources" not in setup and "'-std=' + cxx_std()" in setup
    compile(setup, "setup.py", "exec")
