"""setup.py's console scripts: each target imports and answers --help (a wrong entry point fails here),
and no module edits sys.path."""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"vlbert-train", "vlbert-compare", "vlbert-finetune", "vlbert-evaluate", "vlbert-prepare-captions",
            "vlbert-prepare-text", "vlbert-extract-regions", "vlbert-convert-detector", "vlbert-replay-tracking",
            "vlbert-make-demo-data", "vlbert-pretrain-demo-detector", "vlbert-probe-colours", "vlbert-make-demo-vqa",
            "vlbert-compare-vqa-demo", "vlbert-make-demo-vcr", "vlbert-compare-vcr-demo", "vlbert-import-features"}


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
    """Each command's --help names the command itself, has a one-line description and an example
    (a line that runs the command). Fails if a parser keeps argparse's default prog (the module's
    file name) or a docstring loses its example."""
    module, function = console_scripts()[name].split(":")
    assert module.split(".")[1] in ("cli", "demo", "tracking"), module
    target = getattr(importlib.import_module(module), function)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as e:
        target()  # as the console script calls it: no arguments, sys.argv
    assert e.value.code == 0
    out = capsys.readouterr().out
    out = out[out.find("usage: "):]  # after any line a library prints on import (deepspeed's accelerator)
    assert out.startswith(f"usage: {name} "), out[:200]
    description = out.split("\n\n")[1]
    assert description.strip() and "\n" not in description.strip(), description
    examples = [line for line in out.splitlines() if line.strip().startswith(f"{name} ")]
    assert examples, f"{name} --help shows no example:\n{out}"


def test_console_scripts_exit_with_their_status(monkeypatch, capsys):
    """A command whose ``main`` returns a summary exits 0; one whose ``main`` returns a status
    exits with it (a dict passed to sys.exit would print it and exit 1)."""
    from vlbert.cli.common import console_script

    assert console_script(lambda argv: {"written": 3})() == 0
    assert console_script(lambda argv: 2)() == 2


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


def test_old_spellings_work_hidden_and_warn(capsys):
    """``--output`` and positional ``key=value`` still work, warn, and are absent from --help. Fails
    if an alias stores elsewhere than the new flag, stays silent, or shows in the help."""
    from vlbert.cli.common import add_overrides, add_renamed_flag, command_parser, overrides

    p = command_parser("vlbert-x", "Do x.\n\n    vlbert-x --out here")
    p.add_argument("--out")
    add_renamed_flag(p, "--output", "--out", "out")
    add_overrides(p)
    args = p.parse_args(["--output", "there", "a.b=1", "--set", "c.d=2", "--set", "e=[1, 2]"])
    assert args.out == "there"
    assert overrides(args) == ["a.b=1", "c.d=2", "e=[1, 2]"]
    err = capsys.readouterr().err
    assert "--output is renamed --out" in err and "positional overrides are deprecated" in err
    help_text = p.format_help()
    assert "--output" not in help_text and "positional_overrides" not in help_text
    assert "--set KEY=VALUE" in help_text and help_text.rstrip().endswith("vlbert-x --out here")
    # The new spellings alone: no warning.
    args = p.parse_args(["--out", "here", "--set", "c.d=2"])
    assert overrides(args) == ["c.d=2"] and capsys.readouterr().err == ""
