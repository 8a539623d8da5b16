"""Seed tools: a few vetted tools every new image starts with (today: ``calculate``).

A 135M model cannot multiply 17 by 23, and the forge cannot help it: BRICK at that
size does not write working code. So the capability a small model needs most, exact
arithmetic and unit conversion, ships with A4PS as a tool written and reviewed by
people (``a4ps/tools/seed/calculate.py``). It is an ordinary tool in every other way:
registered in the image as ``tool.calculate`` (``created_by = "seed"``), found by
:meth:`~a4ps.tools.registry.ToolRegistry.match` and the graph's tool choice, run only
in the gVisor sandbox, shown and versioned like a forged tool. Forging stays the way
to new capabilities; a person may edit or replace a seed tool like any other (a
seeded tool that is already in the image is never overwritten).

``calculate`` takes the question's own words (``question``), so the model never
re-types numbers (a small model copying "17 times 23" writes "17 times 32" often
enough to matter); it answers ``{"answer", "value", "kind", "expression"}``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from a4ps.tools.registry import TOOL_PARENT, ToolSpec

if TYPE_CHECKING:
    from a4ps.tools.tool_forge import ToolForge
    from a4ps.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

SEED_DIR = Path(__file__).resolve().parent / "seed"
CREATED_BY = "seed"


@dataclass(frozen=True)
class SeedTool:
    spec: dict[str, Any]
    file: str                                 # under SEED_DIR
    tests: str = ""

    @property
    def source(self) -> str:
        return (SEED_DIR / self.file).read_text(encoding="utf-8")


CALCULATE = SeedTool(
    spec={
        "name": "calculate",
        "description": ("Works out exact arithmetic and unit conversions stated in words or "
                        "symbols: sums, products, quotients, powers, square roots, "
                        "percentages; length, mass, time, volume, area, speed, data and "
                        "temperature units."),
        "inputs": {"question": {"type": "str",
                                "description": "the question in its own words"}},
        "output_type": "dict",
        "examples": [
            {"args": {"question": "What is 17 times 23?"},
             "result": {"answer": "17 × 23 = 391", "value": 391, "kind": "arithmetic",
                        "expression": "17 × 23"}},
            {"args": {"question": "How many minutes are in 3 hours?"},
             "result": {"answer": "3 hours = 180 minutes", "value": 180,
                        "kind": "conversion", "expression": "3 hours to minutes"}},
        ],
    },
    file="calculate.py",
    tests=("from tool import calculate\n\n\n"
           "def test_calculate_arithmetic():\n"
           "    assert calculate('What is 2 to the power of 10?')['value'] == 1024\n"
           "    assert calculate('12 times 12 plus 5')['value'] == 149\n"
           "    assert calculate('What is 15% of 240?')['value'] == 36\n\n\n"
           "def test_calculate_conversion():\n"
           "    assert abs(calculate('Convert 5 miles to kilometers.')['value'] - 8.04672) < 1e-9\n"
           "    assert calculate('Convert 0 degrees Celsius to Fahrenheit.')['value'] == 32\n\n\n"
           "def test_calculate_refuses_what_it_cannot_compute():\n"
           "    try:\n"
           "        calculate('What is the capital of France?')\n"
           "    except ValueError:\n"
           "        return\n"
           "    raise AssertionError('no computation should be found')\n"),
)

SEED_TOOLS: tuple[SeedTool, ...] = (CALCULATE,)


def seed(registry: ToolRegistry, tools: tuple[SeedTool, ...] = SEED_TOOLS) -> list[str]:
    """Register each seed tool this image has never had; returns the names added.

    The parent ``tool`` proto's ``seeded`` slot remembers what was seeded, so a seed
    tool a person deleted or replaced stays as they left it. Nothing runs here (a start
    must stay fast): the seed tools' cases run in the sandbox in the test suite
    (tests/test_seed_tools.py) and through :func:`verify`.
    """
    protos = registry.protos
    if TOOL_PARENT not in protos:
        protos.create(TOOL_PARENT, {"kind": "tool"})
    done = list(protos.get(TOOL_PARENT).get("seeded") or [])
    added = []
    for tool in tools:
        spec = ToolSpec.model_validate(tool.spec)
        if spec.name in done:
            continue
        if spec.name not in registry:
            registry.register(spec, tool.source, tool.tests, CREATED_BY,
                              {"seeded": True, "ok": True,
                               "summary": "vetted seed tool shipped with A4PS; its cases "
                                          "run in the sandbox in the test suite"})
            added.append(spec.name)
        done.append(spec.name)
    if len(done) != len(protos.get(TOOL_PARENT).get("seeded") or []):
        protos.update(TOOL_PARENT, {"seeded": done})
    if added:
        log.info("seeded tools: %s", ", ".join(added))
    return added


def verify(forge: ToolForge, tool: SeedTool = CALCULATE) -> dict[str, Any]:
    """The forge's own test stage on a seed tool: its examples and tests in the sandbox,
    judged on the host (the verdict a forged tool must earn)."""
    verdict: dict[str, Any] = forge.verify(ToolSpec.model_validate(tool.spec), tool.source,
                                           tool.tests)
    return verdict
