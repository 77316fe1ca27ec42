"""Example studies shipped with the package: study YAML files and their data (see make_data.py)."""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent


def study_paths() -> dict[str, Path]:
    """Example study name (file stem) -> path of its YAML file."""
    return {p.stem: p for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}
