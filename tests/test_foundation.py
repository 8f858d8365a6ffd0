"""Package metadata, setup(), and the `engram` command."""
import importlib.metadata
import random
import re
import subprocess
import sys
try:
    import tomllib                      # Python 3.11+
except ModuleNotFoundError:             # Python 3.10: the [test] extra installs tomli
    import tomli as tomllib
from pathlib import Path

import numpy as np
import torch

import engramlib
from engramlib.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0].lower()


def test_environment_yml_installs_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(s) for s in project["dependencies"] + project["optional-dependencies"]["test"]
                                      + project["optional-dependencies"]["lab"] if ";" not in s}
    conda = {"pytorch": "torch"}
    listed = set()
    text = (ROOT / "environment.yml").read_text().split("dependencies:", 1)[1]
    for line in text.splitlines():
        m = re.match(r"^\s+-\s+([A-Za-z0-9_.-]+)", line)
        if m and m.group(1) not in ("python", "pip", "-e"):
            listed.add(conda.get(m.group(1).lower(), m.group(1).lower()))
    assert wanted == listed, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"
    assert "-e ." in (ROOT / "environment.yml").read_text()


def test_dependencies_are_lower_bounds_not_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        assert "==" not in spec and ">=" in spec, spec


def test_setup_seeds_everything_and_reads_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_MODEL", "gpt2-medium")
    monkeypatch.setenv("ENGRAM_FAST", "1")
    monkeypatch.delenv("ENGRAM_SMOKE", raising=False)
    s = engramlib.setup(seed=7)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    engramlib.setup(seed=7, verbose=False)
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())
    assert s.model_name == "gpt2-medium" and s.fast and s.device in ("cpu", "cuda", "mps")
    assert s.size(full=100, fast=3) == 3
    line = capsys.readouterr().out
    assert "torch" in line and "transformers" in line and "gpt2-medium" in line
    monkeypatch.setenv("ENGRAM_FAST", "0")
    monkeypatch.delenv("ENGRAM_MODEL")
    s = engramlib.setup(verbose=False)
    assert not s.fast and s.model_name is None and s.size(full=100, fast=3) == 100


def test_setup_prints_the_installed_version_and_unknown_when_not_installed(monkeypatch, capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert engramlib.__version__ == project["version"]
    engramlib.setup()
    assert capsys.readouterr().out.startswith(f"engramlib {importlib.metadata.version('engramlib')} | ")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    engramlib.setup()
    assert capsys.readouterr().out.startswith("engramlib unknown | ")


def test_engram_version_and_info(capsys):
    try:
        cli_main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert engramlib.__version__ in capsys.readouterr().out
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tinyworld\s+available offline", out)
    assert re.search(r"gpt2-xl\s+(available offline|needs a download)", out)


def test_engram_console_script_is_installed():
    exe = Path(sys.executable).parent / "engram"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and engramlib.__version__ in out.stdout


def test_python_versions_agree():
    """pyproject, environment.yml and the README name the same lowest Python."""
    lowest = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    version = re.fullmatch(r">=(3\.\d+)", lowest)[1]
    assert f"python>={version}" in (ROOT / "environment.yml").read_text()
    assert f"Python ≥ {version}" in (ROOT / "README.md").read_text()


def test_one_variable_puts_every_cache_on_drive(monkeypatch, tmp_path, capsys):
    """engramlib.cache_on_drive() (Colab: Drive mounted first) sets ENGRAM_CACHE, which the Hub
    models follow too (models.hub_cache_dir), so a new runtime reuses model, C and data."""
    import engramlib
    from engramlib.download import cache_dir
    from engramlib.models import hub_cache_dir
    monkeypatch.delenv("ENGRAM_CACHE", raising=False)
    assert hub_cache_dir() is None                      # the Hugging Face default
    folder = engramlib.cache_on_drive(str(tmp_path / "drive" / "engram-cache"))
    assert Path(folder).is_dir() and cache_dir() == Path(folder)
    assert hub_cache_dir() == str(Path(folder) / "huggingface")
    assert folder in capsys.readouterr().out
