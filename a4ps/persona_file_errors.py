"""The persona-file error, apart from the exporter/importer, so the daemon and CLI can
catch it without importing the archive machinery (tests/test_import_cost.py)."""
from __future__ import annotations


class PersonaFileError(ValueError):
    """A persona file or request was refused; nothing was written."""
