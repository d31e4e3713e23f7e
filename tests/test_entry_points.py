"""setup.py's console scripts: each target imports and answers --help (a wrong entry point fails here),
and no module edits sys.path."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"vlbert-train", "vlbert-compare", "vlbert-finetune", "vlbert-evaluate", "vlbert-prepare-captions",
            "vlbert-prepare-text", "vlbert-extract-regions", "vlbert-convert-detector", "vlbert-import-features"}


def console_scripts() -> dict[str, str]:
    """name -> "module:function", read from setup.py's source (setup() is not run)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entries = ast.literal_eval(node.value)["console_scripts"]
            return dict(e.replace(" ", "").split("=", 1) for e in entries)
    raise AssertionError("setup.py has no entry_points")


def test_every_command_has_a_console_script():
    assert set(console_scripts()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_console_script_target_imports_and_prints_help(name, monkeypatch, capsys):
    module, function = console_scripts()[name].split(":")
    assert module.startswith("vlbert.cli."), module
    target = getattr(importlib.import_module(module), function)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as e:
        target()  # as the console script calls it: no arguments, sys.argv
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_demo_modules_run_with_python_m():
    for name in ("make_data", "pretrain_detector", "probe_colours", "make_vqa", "vqa_compare"):
        run = subprocess.run([sys.executable, "-m", f"vlbert.demo.{name}", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "usage:" in run.stdout, (name, run.stderr[-2000:])


def test_launcher_files_call_the_package_commands():
    """tools/ keeps only the files launchers run by path; each calls a vlbert.cli main."""
    assert sorted(p.name for p in (REPO / "tools").iterdir() if p.suffix == ".py") == ["finetune.py", "train.py"]
    for name in ("train", "finetune"):
        source = (REPO / "tools" / f"{name}.py").read_text()
        assert f"from vlbert.cli.{name} import main" in source


def test_no_module_edits_sys_path():
    pattern = re.compile(r"sys\.path\.(insert|append)|sys\.path\s*=|syspath_prepend")
    offenders = [f"{p.relative_to(REPO)}:{i}" for folder in ("vlbert", "tools", "tests", "bench")
                 for p in (REPO / folder).rglob("*.py") if p.name != Path(__file__).name
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
