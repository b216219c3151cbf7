"""Each distribution installs alone (DESIGN §1): a gateway gets the agent and nothing of the
coordinator, a coordinator host gets no torch.

Each test builds a fresh venv in ``tmp_path`` and pip-installs (not editable) copies of the
source folders, with the repo's constraints so versions match the dev venv. The sources are
copied first because building a wheel in-tree writes ``build/`` and ``*.egg-info`` into the
shared working tree. pip's default cache (~/.cache/pip) is left on; on this machine the
dependencies come from local wheel folders and file:// indexes, so a cold run is already
about as fast as a warm one (~45 s agent incl. torch, ~35 s coordinator).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO_ROOT / "requirements" / "constraints.txt"
TORCH_VERSION = "2.13.0"  # the CPU wheel on this machine; never loosen (CUDA builds are huge)

# What a probe reports: import the entry modules, then look for forbidden packages.
PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys
    from importlib.metadata import distributions
    imports, absent = json.loads(sys.argv[1])
    for name in imports:
        importlib.import_module(name)
    print(json.dumps({
        "present": [name for name in absent if importlib.util.find_spec(name) is not None],
        "distributions": sorted(
            d.metadata["Name"].lower() + "==" + d.version for d in distributions()
        ),
    }))
    """
)


def _copy_sources(folders: list[str], destination: Path) -> list[Path]:
    ignore = shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".pytest_cache"
    )
    copies = []
    for folder in folders:
        copy = destination / folder
        shutil.copytree(REPO_ROOT / folder, copy, ignore=ignore)
        copies.append(copy)
    return copies


def _clean_env(venv: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def _run(command: list[str | Path], *, env: dict[str, str], cwd: Path, timeout: float) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return result.stdout


def _install_alone(tmp_path: Path, folders: list[str]) -> tuple[Path, dict[str, str]]:
    """Fresh venv with exactly ``folders`` (and their dependencies) installed."""
    venv = tmp_path / "venv"
    env = _clean_env(venv)
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", venv], env=env, cwd=tmp_path, timeout=300)
    sources = _copy_sources(folders, tmp_path / "src")
    _run(
        [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "--no-compile",  # a throwaway venv: skip byte-compiling torch's thousands of files
            "-c",
            CONSTRAINTS,
            *sources,
        ],
        env=env,
        cwd=tmp_path,
        timeout=1800,
    )
    print(f"venv + install of {' '.join(folders)}: {time.monotonic() - started:.1f} s")
    return venv, env


def _probe(
    venv: Path, env: dict[str, str], *, imports: list[str], absent: list[str]
) -> dict[str, list[str]]:
    output = _run(
        [venv / "bin" / "python", "-I", "-c", PROBE, json.dumps([imports, absent])],
        env=env,
        cwd=venv.parent,
        timeout=300,
    )
    report: dict[str, list[str]] = json.loads(output.strip().splitlines()[-1])
    return report


@pytest.mark.slow
def test_agent_installs_without_coordinator_or_sqlalchemy(tmp_path: Path) -> None:
    venv, env = _install_alone(tmp_path, ["common", "agent"])

    report = _probe(
        venv,
        env,
        imports=["fedgate_agent.cli"],
        absent=["sqlalchemy", "alembic", "psycopg", "fedgate_coordinator", "fedgate_bridge"],
    )
    assert report["present"] == []
    distributions = report["distributions"]
    torch = [d for d in distributions if d.startswith("torch==")]
    assert len(torch) == 1
    assert torch[0].removeprefix("torch==").split("+")[0] == TORCH_VERSION
    assert not [d for d in distributions if d.startswith("nvidia-")], "a CUDA build came in"
    assert "fedgate-agent==0.1.0" in distributions
    assert "fedgate-common==0.1.0" in distributions

    started = time.monotonic()
    help_text = _run([venv / "bin" / "fedgate-agent", "--help"], env=env, cwd=tmp_path, timeout=300)
    print(f"fedgate-agent --help: {time.monotonic() - started:.1f} s")
    assert "Usage:" in help_text
    _installs_its_service(venv, env, tmp_path, "fedgate-agent", "agent.toml")


def _installs_its_service(
    venv: Path, env: dict[str, str], tmp_path: Path, program: str, config: str
) -> None:
    """`install-service --root` works from the installed package alone: the wheel carries
    the commented configuration it writes (no source tree around)."""
    stage = tmp_path / "stage"
    _run(
        [venv / "bin" / program, *(["--state-dir", str(tmp_path / "st")] if "coord" in program
          else []), "install-service", "--root", stage, "--json"],
        env=env,
        cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    written = next(stage.glob(f"etc/fedgate/{config}*"))
    assert written.read_text() == (REPO_ROOT / "packaging" / f"{config}.example").read_text()
    assert (stage / "etc/systemd/system" / f"{program}.service").exists()


@pytest.mark.slow
def test_coordinator_installs_without_torch(tmp_path: Path) -> None:
    venv, env = _install_alone(tmp_path, ["common", "coordinator"])

    report = _probe(
        venv,
        env,
        imports=["fedgate_coordinator.cli"],
        absent=["torch", "fedgate_agent", "fedgate_bridge"],
    )
    assert report["present"] == []
    assert "fedgate-coordinator==0.1.0" in report["distributions"]
    assert not [d for d in report["distributions"] if d.startswith(("torch==", "nvidia-"))]

    help_text = _run(
        [venv / "bin" / "fedgate-coordinator", "--help"], env=env, cwd=tmp_path, timeout=300
    )
    assert "Usage:" in help_text
    _installs_its_service(venv, env, tmp_path, "fedgate-coordinator", "coordinator.toml")
