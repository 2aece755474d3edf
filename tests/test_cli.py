"""Hydra's own flags pass through the error boundary, and `maskrun --help` stays light."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

HELP_PATH = """
import json, sys
sys.argv = ["maskrun", "--help"]
from maskrun import cli
try:
    cli.main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({"exit": code, "torch_imported": "torch" in sys.modules}))
"""


def test_help_lists_the_groups_without_importing_torch(tmp_path):
    result = subprocess.run([sys.executable, "-c", HELP_PATH], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    *help_text, outcome = result.stdout.strip().splitlines()
    assert json.loads(outcome) == {"exit": 0, "torch_imported": False}
    mask_options = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "mask").glob("*.yaml"))
    assert f"mask: {', '.join(mask_options)}" in help_text and not result.stderr
    assert help_text[0].startswith("maskrun is powered by Hydra")


@pytest.mark.parametrize("flags, expected", [
    (["--cfg", "job", "mask.ratio=0.3"], "  ratio: 0.3"),
    (["--info", "defaults"], "mask/importance"),
    (["-sc", "install=bash"], "hydra_bash_completion"),
])
def test_hydra_flags_work(tmp_path, flags, expected):
    result = run_cli(flags, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_every_maskrun_package_is_installed_by_a_non_editable_install():
    import tomllib

    root = Path(__file__).parent.parent
    declared = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(root).parts) for init in (root / "maskrun").rglob("__init__.py")}
    assert on_disk <= declared, f"add {sorted(on_disk - declared)} to [tool.setuptools] packages"
