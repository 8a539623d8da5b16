"""mypy --strict on a4ps/ (config: mypy.ini), so CI runs the type checker.

mypy.ini relaxes (``ignore_errors``) only the UI's Kivy glue, as issue 19 allows: a
module that does not import Kivy may not be relaxed, and a relaxed module that has
become clean must leave the list, so it only shrinks.
"""
from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mypy.ini"
KIVY_GLUE = "a4ps.ui.app"      # the first section of the Kivy glue (out of scope)
IMPORTS_KIVY = re.compile(r"^\s*(from kivy[\s.]|import kivy\b)", re.M)


def _mypy(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def relaxed_modules(*, with_kivy_glue: bool = False) -> list[str]:
    """Modules mypy.ini relaxes (the UI's Kivy glue only when asked)."""
    cp = configparser.ConfigParser()
    cp.read(CONFIG)
    out: list[str] = []
    for section in cp.sections():
        if section.startswith("mypy-") and cp[section].getboolean("ignore_errors", False):
            mods = section[len("mypy-"):].split(",")
            if with_kivy_glue or KIVY_GLUE not in mods:
                out += mods
    return out


def test_only_the_kivy_glue_is_relaxed() -> None:
    """Every relaxed module is a4ps.ui code that imports Kivy; nothing else is."""
    assert relaxed_modules() == [], ("mypy.ini relaxes modules outside the Kivy glue; "
                                     "fix their types instead: " f"{relaxed_modules()}")
    for mod in relaxed_modules(with_kivy_glue=True):
        path = ROOT / (mod.replace(".", "/") + ".py")
        assert mod.startswith("a4ps.ui.") and path.is_file(), f"{mod} is not a UI module"
        assert IMPORTS_KIVY.search(path.read_text(encoding="utf-8")), \
            f"{mod} does not import Kivy: it is not Kivy glue, type it strictly"


@pytest.fixture(scope="module")
def strict_everywhere(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """One mypy run with nothing relaxed: its errors, by module. A module's errors do
    not depend on another module being relaxed, so this one run answers both tests."""
    text = re.sub(r"^\[mypy-a4ps\.[^\]]*\]\nignore_errors = True\n", "",
                  CONFIG.read_text(), flags=re.M)
    strict_all = tmp_path_factory.mktemp("mypy") / "mypy.ini"
    strict_all.write_text(text)
    r = _mypy(strict_all)
    assert r.returncode in (0, 1), f"mypy did not run:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    errors: dict[str, list[str]] = {}
    for m in re.finditer(r"^(a4ps/\S+)\.py:\d+: error.*$", r.stdout, re.M):
        mod = m.group(1).replace("/", ".").removesuffix(".__init__")
        errors.setdefault(mod, []).append(m.group(0))
    # an error with no module line ("Duplicate module named ...") must not pass unseen
    unplaced = [line for line in r.stdout.splitlines() if ": error:" in line
                and not re.match(r"^a4ps/\S+\.py:\d+: error", line)]
    assert not unplaced, "mypy errors outside a4ps modules:\n" + "\n".join(unplaced[:20])
    return errors


@pytest.mark.slow
def test_mypy_strict_passes(strict_everywhere: dict[str, list[str]]) -> None:
    relaxed = set(relaxed_modules(with_kivy_glue=True))
    found = [e for mod, errs in strict_everywhere.items() if mod not in relaxed for e in errs]
    assert not found, ("mypy --strict found errors (fix them; do not add modules to "
                       "mypy.ini's relaxed list):\n" + "\n".join(found[:60]))


@pytest.mark.slow
def test_the_relaxed_list_is_honest(strict_everywhere: dict[str, list[str]]) -> None:
    """Every module mypy.ini still relaxes has strict errors; a clean one must leave."""
    clean = sorted(set(relaxed_modules(with_kivy_glue=True)) - set(strict_everywhere))
    assert not clean, f"now strict-clean: remove them from mypy.ini's relaxed list: {clean}"
