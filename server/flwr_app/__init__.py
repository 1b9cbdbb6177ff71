"""The Flower app bundle's folder: only its ``pyproject.toml`` matters.

:func:`app_dir` is what ``flwr run`` builds the FAB from.
"""

from pathlib import Path


def app_dir() -> Path:
    return Path(__file__).resolve().parent
