"""ediff-train: eDiff-I-style expert denoisers (see README.md). A regular package, so that
`ediff_train.__version__` exists and a non-editable install finds the top-level modules.

Kept import-light: every `ediff_train.*` import runs this file first."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the source checkout: conf/, train.py, pyproject.toml
CONF_DIR = REPO / "conf"


def _version() -> str:
    """The installed distribution's version; from a source tree, pyproject.toml's."""
    try:
        return metadata.version("ediff-train")
    except metadata.PackageNotFoundError:
        pyproject = REPO / "pyproject.toml"
        try:
            found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
        except OSError:
            found = None
        return found.group(1) if found else "0+unknown"


__version__ = _version()

from ediff_train import legacy  # noqa: E402  (old module paths name their new home)

legacy.install()
