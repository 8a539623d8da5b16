"""The tool registry: tools as protos, versions, source mirror, search, sandboxed calls."""
from __future__ import annotations

import pytest

from a4ps.events import EventBus
from a4ps.image import ImageStore
from a4ps.proto import ProtoManager
from a4ps.tools.registry import (ToolCallError, ToolNotFound, ToolRegistry, ToolSpec,
                                 signature_of, tool_name)
from a4ps.tools.sandbox import make_sandbox

MEAN_SPEC = ToolSpec(name="mean", description="Arithmetic mean (average) of a list of numbers",
                     inputs={"values": {"type": "list[float]", "description": "the numbers"}},
                     output_type="float", examples=[{"args": {"values": [1, 2, 3]}, "result": 2}])
MEAN_V1 = "import statistics\n\ndef mean(values: list[float]) -> float:\n    return statistics.mean(values)\n"
MEAN_V2 = ("def mean(values: list[float], weights: list[float] | None = None) -> float:\n"
           "    weights = weights or [1] * len(values)\n"
           "    return sum(v * w for v, w in zip(values, weights)) / sum(weights)\n")
DAYS_SPEC = ToolSpec(name="days_between", description="Number of calendar days between two ISO dates",
                     inputs={"start": "str", "end": "str"}, output_type="int")
DAYS = ("from datetime import date\n\ndef days_between(start: str, end: str) -> int:\n"
        "    return (date.fromisoformat(end) - date.fromisoformat(start)).days\n")
BROKEN = "def broken(x):\n    return 1 / x\n"


@pytest.fixture
def registry(settings, bus, sandbox, tmp_path):
    from a4ps.models.embeddings import HashEmbedder
    return ToolRegistry(ProtoManager(bus), settings, bus, embedder=HashEmbedder(),
                        sandbox=sandbox, tools_dir=tmp_path / "tools")


def test_tool_names_become_identifiers():
    assert tool_name("Mean Calc") == "mean_calc"
    assert tool_name("2nd-power") == "t_2nd_power"
    assert tool_name("lambda") == "lambda_tool"
    assert ToolSpec(name="Days Between!", description="d").name == "days_between"
    with pytest.raises(ValueError):
        ToolSpec(name="x", description="  ")


def test_signature_comes_from_the_source():
    assert signature_of(MEAN_V1, "mean") == "mean(values: list[float]) -> float"
    assert signature_of("x = 1", "mean") == "mean(...)"


def test_register_makes_a_proto_and_mirrors_the_source(registry, tmp_path):
    proto = registry.register(MEAN_SPEC, MEAN_V1, "def test_x(): pass\n", "BRICK",
                              {"passed": 2, "total": 2})
    assert proto.name == "tool.mean" and proto.parent.name == "tool"
    slots = proto.own_slots()
    assert slots["name"] == "mean" and slots["version"] == 1 and slots["created_by"] == "BRICK"
    assert slots["signature"] == "mean(values: list[float]) -> float"
    assert slots["source"] == MEAN_V1 and slots["tests"] == "def test_x(): pass\n"
    assert slots["test_results"] == {"passed": 2, "total": 2} and slots["created_at"] > 0
    mirror = (tmp_path / "tools" / "mean.py").read_text()
    assert mirror.endswith(MEAN_V1) and mirror.startswith("# Forged tool mean v1")
    [listed] = registry.list()
    assert listed["name"] == "mean" and listed["tests_passed"] == 2 and listed["versions"] == [1]


def test_reforging_a_name_makes_a_new_version_and_keeps_the_old(registry, tmp_path):
    registry.register(MEAN_SPEC, MEAN_V1, "", "BRICK")
    registry.register(MEAN_SPEC, MEAN_V2, "", "BRICK")
    cur = registry.get("mean")
    assert cur.lookup("version")[1] == 2 and cur.lookup("source")[1] == MEAN_V2
    old = registry.get_version("mean", 1)
    assert old.name == "tool.mean.v1" and old.lookup("source")[1] == MEAN_V1
    assert old.parent.name == "tool"
    assert registry.versions("mean") == [1, 2]
    assert [t["name"] for t in registry.list()] == ["mean"]      # old versions aren't listed
    assert (tmp_path / "tools" / "mean.py").read_text().endswith(MEAN_V2)
    assert registry.call("mean", {"values": [1, 3], "weights": [3, 1]}) == 1.5


def test_call_runs_in_the_sandbox_and_returns_json(registry):
    registry.register(DAYS_SPEC, DAYS, "", "BRICK")
    assert registry.call("days_between", {"start": "2024-02-01", "end": "2024-03-01"}) == 29
    assert registry.call("Days Between", {"start": "2024-01-01", "end": "2024-01-02"}) == 1


def test_call_errors_carry_the_sandbox_traceback(registry):
    registry.register(ToolSpec(name="broken", description="divides one by x"), BROKEN, "", "BRICK")
    with pytest.raises(ToolCallError) as err:
        registry.call("broken", {"x": 0})
    assert "ZeroDivisionError" in err.value.stderr and "ZeroDivisionError" in str(err.value)
    registry.register(DAYS_SPEC, DAYS, "", "BRICK")
    with pytest.raises(ToolCallError, match=r"unknown argument\(s\) \['nope'\]; missing argument\(s\) \['start', 'end'\]"):
        registry.call("days_between", {"nope": 1})
    with pytest.raises(ToolNotFound, match="forge it first"):
        registry.call("nothing_here", {})


def test_call_never_runs_on_the_host_without_a_sandbox(settings, bus, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    sb = make_sandbox(settings)
    reg = ToolRegistry(ProtoManager(bus), settings, bus, sandbox=sb, tools_dir=tmp_path / "t")
    marker = tmp_path / "ran"
    src = f"def touch():\n    open({str(marker)!r}, 'w').write('x')\n    return 1\n"
    reg.register(ToolSpec(name="touch", description="touches a file"), src, "", "BRICK")
    with pytest.raises(ToolCallError, match="sandbox unavailable: runsc not found"):
        reg.call("touch", {})
    assert not marker.exists()


def test_find_ranks_by_description_similarity(registry):
    registry.register(MEAN_SPEC, MEAN_V1, "", "BRICK")
    registry.register(DAYS_SPEC, DAYS, "", "BRICK")
    hits = registry.find("how many days between two dates", k=2)
    assert [h["name"] for h in hits] == ["days_between", "mean"]
    assert hits[0]["score"] > hits[1]["score"]
    assert registry.find("mean", k=1)[0]["name"] == "mean"       # an exact name wins
    assert registry.find("anything", k=0) == []


def test_tools_survive_an_image_restart_and_can_be_called(settings, sandbox, tmp_path):
    bus = EventBus()
    protos = ProtoManager(bus)
    reg = ToolRegistry(protos, settings, bus, sandbox=sandbox, tools_dir=tmp_path / "t1")
    reg.register(DAYS_SPEC, DAYS, "", "BRICK", {"passed": 1, "total": 1})
    store = ImageStore(settings.image_path, settings.snapshot_dir)
    store.save({"protos": protos.image_state()})

    parts, _ = ImageStore(settings.image_path, settings.snapshot_dir).load()
    protos2 = ProtoManager(EventBus())
    protos2.restore_image(parts["protos"])
    reg2 = ToolRegistry(protos2, settings, None, sandbox=sandbox, tools_dir=tmp_path / "t2")
    assert [t["name"] for t in reg2.list()] == ["days_between"]
    assert reg2.sync_files() == 1 and (tmp_path / "t2" / "days_between.py").exists()
    assert reg2.call("days_between", {"start": "2023-12-31", "end": "2024-01-31"}) == 31


def test_cli_tools_list_and_show_read_the_saved_image(settings, sandbox, tmp_path, capsys):
    from a4ps.cli import main
    protos = ProtoManager()
    reg = ToolRegistry(protos, settings, None, sandbox=sandbox, tools_dir=tmp_path / "t")
    reg.register(MEAN_SPEC, MEAN_V1, "def test_m(): pass\n", "BRICK", {"passed": 1, "total": 1})
    reg.register(MEAN_SPEC, MEAN_V2, "", "BRICK", {"passed": 1, "total": 1})
    ImageStore(settings.image_path, settings.snapshot_dir).save({"protos": protos.image_state()})
    base = ["--data-dir", str(settings.data_dir), "tools"]
    assert main(base + ["list"]) == 0
    out = capsys.readouterr().out
    assert "mean(values: list[float], weights: list[float] | None=None) -> float  v2" in out
    assert main(base + ["show", "mean", "--version", "1"]) == 0
    out = capsys.readouterr().out
    assert "statistics.mean(values)" in out and "def test_m()" in out
    assert main(base + ["show", "nope"]) == 1
    assert "no tool named 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_find_with_the_real_minilm_embedder_understands_paraphrases(settings, bus, tmp_path,
                                                                    minilm):
    reg = ToolRegistry(ProtoManager(bus), settings, bus, embedder=minilm,
                       tools_dir=tmp_path / "t")
    reg.register(MEAN_SPEC, MEAN_V1, "", "BRICK")
    reg.register(DAYS_SPEC, DAYS, "", "BRICK")
    assert reg.find("average of some values", k=1)[0]["name"] == "mean"
    assert reg.find("how long from one date until another", k=1)[0]["name"] == "days_between"


# -- issue 14.6: tool source is data under the data directory ---------------------------------

def _checkout_entries() -> set[str]:
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if "__pycache__" not in line}


def test_tool_source_lives_under_the_data_dir_and_the_checkout_stays_clean(settings, bus, sandbox):
    import sys
    before = _checkout_entries()
    reg = ToolRegistry(ProtoManager(bus), settings, bus, sandbox=sandbox)   # as System builds it
    assert reg.tools_dir == settings.data_dir / "tools"
    reg.register(MEAN_SPEC, MEAN_V1, "", "BRICK")
    assert reg.sync_files() == 1
    assert reg.call("mean", {"values": [1, 2, 3]}) == 2
    mirror = settings.data_dir / "tools" / "mean.py"
    assert mirror.read_text().endswith(MEAN_V1)
    assert not (settings.data_dir / "tools" / "__init__.py").exists()      # not a package
    assert not any(str(settings.data_dir) in str(getattr(m, "__file__", "") or "")
                   for m in list(sys.modules.values()))                      # never imported
    assert _checkout_entries() == before


def test_mirrors_an_earlier_version_left_in_the_package_are_moved_out(registry, tmp_path):
    legacy = tmp_path / "pkg" / "dynamic_tools"
    legacy.mkdir(parents=True)
    (legacy / "__init__.py").write_text('"""Forged tools\' source files, mirrored (git-ignored)."""\n')
    (legacy / "fib.py").write_text("# Forged tool fib v1 by BRICK. The live image...\ndef fib(n):\n    return n\n")
    (legacy / "mine.py").write_text("def not_a_mirror():\n    pass\n")
    moved = registry.move_legacy_mirrors(legacy)
    assert [p.name for p in moved] == ["fib.py"]
    assert (registry.tools_dir / "from-package" / "fib.py").read_text().startswith("# Forged tool fib")
    assert sorted(p.name for p in legacy.iterdir()) == ["mine.py"]     # not ours: left alone
    (legacy / "mine.py").unlink()
    registry.move_legacy_mirrors(legacy)
    assert not legacy.exists()


def test_the_package_holds_no_tool_source():
    from pathlib import Path

    import a4ps.tools
    assert not (Path(a4ps.tools.__file__).parent / "dynamic_tools").exists()


# -- issue 14.5: found before forged ------------------------------------------------------------

def test_match_finds_a_tool_by_name_then_description_when_its_parameters_fit(registry):
    registry.register(MEAN_SPEC, MEAN_V1, "", "BRICK")
    registry.register(DAYS_SPEC, DAYS, "", "BRICK")
    hit = registry.match("mean", "anything", {"values": [1]})
    assert hit["name"] == "mean" and hit["how"] == "name"
    hit = registry.match("average", "average of a list of numbers", {"values": [1, 2]})
    assert hit["name"] == "mean" and hit["how"] == "description" and hit["score"] >= 0.75
    # the parameters must fit: unknown or missing arguments mean another tool
    assert registry.match("mean", "mean", {"numbers": [1]}) is None
    assert registry.match("days_between", None, {"start": "2024-01-01"}) is None
    assert registry.match(None, "average of a list of numbers", {}) is None   # values required
    assert registry.match("median", "the middle value of a sorted list", {"values": [1]}) is None


def test_an_old_version_can_still_be_called(registry):
    registry.register(MEAN_SPEC, MEAN_V1, "", "BRICK")
    registry.register(MEAN_SPEC, MEAN_V2, "", "BRICK")
    assert registry.call("mean", {"values": [1, 3], "weights": [3, 1]}) == 1.5
    assert registry.call("mean", {"values": [1, 3]}, version=1) == 2
    with pytest.raises(ToolCallError, match="unknown argument"):
        registry.call("mean", {"values": [1], "weights": [1]}, version=1)
