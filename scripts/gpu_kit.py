"""The GPU kit's lock list and its checks (used by gpu_kit_gather.sh and tests/test_gpu_kit.py).

The GPU host (docs/install.md, "Offline GPU hosts") has Python 3.12, a CUDA torch and many packages
(scripts/gpu_kit_host.txt) but no deepspeed, mmcv, mmengine, mmdet or mlflow, and no network. The kit is
a folder of what it lacks: wheels for Python 3.12 on manylinux x86-64, deepspeed built here as a wheel,
and mmcv's sdist (its CUDA ops are compiled there). scripts/gpu_kit.lock pins every file of it:

    name==version                 a wheel from PyPI
    name==version  build          a wheel built here from the sdist (pure Python)
    name==version  sdist          the source archive itself

    python scripts/gpu_kit.py relock            # resolve the closure for Python 3.12 (needs PyPI), rewrite the lock
    python scripts/gpu_kit.py check KIT [--python 3.12]   # offline: KIT holds the lock, every requirement is met, size
    python scripts/gpu_kit.py pins              # offline: the lock agrees with setup.py's pins
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "scripts" / "gpu_kit.lock"
HOST = ROOT / "scripts" / "gpu_kit_host.txt"
KIT_LIMIT_BYTES = 64 * 2**20 - 8 * 2**20  # the kit travels with the working tree in 64 MiB: leave that 8
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
# What the kit is for: the engines the host lacks, the vlbert dependencies it lacks, and deepspeed's own
# (deepspeed comes as an sdist only, so its requirements are added here by hand: see `deepspeed_requires`).
TOP = ("mmengine==0.10.7", "mmdet==3.3.0", "mlflow-skinny==3.17.2", "zstandard", "braceexpand", "hjson", "pydantic")
BUILT = {"deepspeed": "0.19.8"}
SDISTS = {"mmcv": "2.1.0"}


@dataclass(frozen=True)
class Entry:
    name: str  # canonical
    version: str
    kind: str  # "wheel", "build" or "sdist"


def read_lock(path: Path = LOCK) -> dict[str, Entry]:
    entries = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s]+)(?:\s+(build|sdist))?", line)
        if not m:
            raise ValueError(f"{path}:{n}: expected 'name==version [build|sdist]', got {raw!r}")
        name = canonicalize_name(m[1])
        if name in entries:
            raise ValueError(f"{path}:{n}: {name} is listed twice")
        entries[name] = Entry(name, m[2], m[3] or "wheel")
    return entries


def read_host(path: Path = HOST) -> tuple[dict[str, str | None], dict[str, str]]:
    """(package -> version or None when unknown, requirement name -> the host package that meets it)."""
    have, alias = {}, {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" in line and "==" not in line:
            a, b = (canonicalize_name(s.strip()) for s in line.split("="))
            alias[a] = b
            continue
        name, _, version = line.partition("==")
        have[canonicalize_name(name)] = version or None
    return have, alias


def marker_env(python: str = PYTHON) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python, python_full_version=python + ".3", sys_platform="linux", os_name="posix",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
               platform_python_implementation="CPython")
    return env


def wheel_requires(path: Path) -> list[Requirement]:
    """Requires-Dist of a wheel, without extras' requirements."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or "extra" not in str(req.marker):
                out.append(req)
    return out


def wheel_fits(path: Path, python: str = PYTHON) -> bool:
    """Whether the wheel installs on CPython ``python`` on manylinux x86-64."""
    _, _, _, tags = parse_wheel_filename(path.name)
    cp = "cp" + python.replace(".", "")
    for t in tags:
        interp_ok = t.interpreter in ("py3", "py2.py3", cp) or (t.interpreter.startswith("cp3") and t.abi == "abi3"
                                                                and int(t.interpreter[3:]) <= int(cp[3:]))
        abi_ok = t.abi in ("none", "abi3", cp)
        plat_ok = t.platform == "any" or t.platform in PLATFORMS or (
            re.fullmatch(r"manylinux_2_(\d+)_x86_64", t.platform) and int(t.platform.split("_")[2]) <= 39)
        if interp_ok and abi_ok and plat_ok:
            return True
    return False


def kit_files(kit: Path) -> dict[str, Path]:
    """Canonical name -> file, for the wheels and sdists in ``kit``."""
    out = {}
    for f in sorted(kit.glob("wheels/*.whl")):
        out[canonicalize_name(parse_wheel_filename(f.name)[0])] = f
    for f in sorted(kit.glob("sdist/*.tar.gz")):
        out[canonicalize_name(f.name[: -len(".tar.gz")].rsplit("-", 1)[0])] = f
    return out


def check_kit(kit: Path, lock: dict[str, Entry] | None = None, python: str = PYTHON) -> list[str]:
    """Problems with the gathered kit (an empty list when it is complete and consistent)."""
    lock = read_lock() if lock is None else lock
    have, alias = read_host()
    files, problems = kit_files(kit), []
    for e in lock.values():
        f = files.get(e.name)
        if f is None:
            problems.append(f"{e.name}=={e.version} ({e.kind}) is missing from {kit}")
            continue
        version = parse_wheel_filename(f.name)[1] if f.suffix == ".whl" else f.name[:-7].rsplit("-", 1)[1]
        if Version(str(version)) != Version(e.version):
            problems.append(f"{f.name}: the lock says {e.name}=={e.version}")
        if f.suffix == ".whl" and not wheel_fits(f, python):
            problems.append(f"{f.name} does not install on CPython {python} manylinux x86-64")
    for name in set(files) - set(lock):
        problems.append(f"{files[name].name} is in the kit but not in the lock")
    env = marker_env(python)
    for f in files.values():
        if f.suffix != ".whl":
            continue
        for req in wheel_requires(f):
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            problems += requirement_problems(req, f.name, lock, have, alias)
    size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
    if size > KIT_LIMIT_BYTES:
        problems.append(f"the kit holds {size / 2**20:.1f} MiB, over {KIT_LIMIT_BYTES / 2**20:.0f} MiB")
    return problems


def requirement_problems(req: Requirement, who: str, lock: dict[str, Entry], have: dict, alias: dict) -> list[str]:
    name = canonicalize_name(req.name)
    if name in lock:
        if not req.specifier.contains(lock[name].version, prereleases=True):
            return [f"{who} needs {req}, the kit has {name}=={lock[name].version}"]
        return []
    host_name = alias.get(name, name)
    if host_name not in have:
        return [f"{who} needs {req}: neither the kit nor the host has it"]
    version = have[host_name]
    if version is not None and not req.specifier.contains(version, prereleases=True):
        return [f"{who} needs {req}, the host has {host_name}=={version}"]
    return []


def deepspeed_requires() -> list[Requirement]:
    """deepspeed 0.19.8's install requirements (its sdist's requirements/requirements.txt)."""
    return [Requirement(r) for r in ("einops", "hjson", "msgpack", "ninja", "numpy", "packaging>=20.0", "psutil",
                                     "py-cpuinfo", "pydantic>=2.0.0", "torch>=2.0.0", "tqdm")]


def setup_pins() -> dict[str, SpecifierSet]:
    """install_requires of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = [Requirement(ast.literal_eval(elt)) for elt in node.value.elts]
            return {canonicalize_name(r.name): r.specifier for r in reqs}
    raise ValueError("setup.py has no install_requires")


def pin_problems(lock: dict[str, Entry] | None = None) -> list[str]:
    """The lock (and the host, for what the lock leaves to it) against setup.py's pins. mlflow is met by
    mlflow-skinny on the GPU host: the tracking client is the same code without the server's dependencies."""
    lock = read_lock() if lock is None else lock
    have, alias = read_host()
    problems = []
    for name, spec in setup_pins().items():
        kit_name = "mlflow-skinny" if name == "mlflow" else name
        if kit_name in lock:
            version = lock[kit_name].version
        elif alias.get(kit_name, kit_name) in have:
            version = have[alias.get(kit_name, kit_name)]
        else:
            problems.append(f"setup.py needs {name}{spec}: neither the kit nor the host has it")
            continue
        if version is not None and not spec.contains(version, prereleases=True):
            problems.append(f"setup.py needs {name}{spec}, the kit/host has {kit_name}=={version}")
    for req in deepspeed_requires():
        problems += requirement_problems(req, "deepspeed", lock, have, alias)
    return problems


def relock(python: str = PYTHON) -> dict[str, Entry]:
    """Resolve TOP for CPython ``python`` on manylinux x86-64 with pip (metadata only; needs PyPI), drop what the
    host has, add the built and source entries, and write the lock."""
    have, alias = read_host()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(Path(tmp) / "t"), "--python-version", python,
               "--implementation", "cp", "--abi", "cp" + python.replace(".", ""), "--only-binary=:all:"]
        cmd += [a for p in PLATFORMS for a in ("--platform", p)] + list(TOP)
        subprocess.run(cmd, check=True, timeout=600)
        resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                    for i in json.loads(report.read_text())["install"]}
    hosted = set(have) | set(alias)
    lock = {n: Entry(n, v, "wheel") for n, v in sorted(resolved.items()) if n not in hosted}
    lock.update({n: Entry(n, v, "build") for n, v in BUILT.items()})
    lock.update({n: Entry(n, v, "sdist") for n, v in SDISTS.items()})
    lines = ["# Written by `python scripts/gpu_kit.py relock` (do not edit by hand): every file of the GPU kit.",
             f"# The closure of {', '.join(TOP)} for CPython {python} on manylinux x86-64,",
             "# less what the GPU host has (scripts/gpu_kit_host.txt); deepspeed built here; mmcv as source."]
    lines += [f"{e.name}=={e.version}" + ("" if e.kind == "wheel" else f"  {e.kind}") for e in
              sorted(lock.values(), key=lambda e: e.name)]
    LOCK.write_text("\n".join(lines) + "\n")
    return lock


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("relock")
    sub.add_parser("pins")
    sub.add_parser("list").add_argument("kind", choices=("wheel", "build", "sdist"))
    check = sub.add_parser("check")
    check.add_argument("kit", type=Path)
    check.add_argument("--python", default=PYTHON, help="the CPython version the wheels must install on")
    args = p.parse_args(argv)
    if args.cmd == "relock":
        print(f"{len(relock())} entries written to {LOCK}")
        return 0
    if args.cmd == "list":  # for the gather script: name==version per line
        print("\n".join(f"{e.name}=={e.version}" for e in read_lock().values() if e.kind == args.kind))
        return 0
    problems = pin_problems() if args.cmd == "pins" else check_kit(args.kit, python=args.python)
    for line in problems:
        print("PROBLEM", line)
    print(f"{args.cmd}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
