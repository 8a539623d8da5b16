"""Curator: ALFRED-as-judge scores parsed, threshold, no double counting, votes, trigger.

Real parts: EventBus, ProtoManager with the persona's live invoke_llm, ModelManager on
the scripted backend (the judge's replies), LanceDB memory with the hash embedder.
The fine-tuner is a recording stand-in here; tests/test_finetune.py runs the real one.
"""
from __future__ import annotations

import json
import time

import pytest

from a4ps.events import EventRecorder
from a4ps.fine_tuning.evaluation import parse_score, parse_vote
from a4ps.services.curator_service import Curator, split_interaction


@pytest.mark.parametrize("reply,score", [
    ("4.5", 4.5),
    ("Score: 4", 4.0),
    ("garbage", None),
    ("7", None),
    ("SCORE: 3.5\nCRITICAL: ROBIN", 3.5),
    ("I rate it 4 out of 5.", 4.0),
    ("Score: 8/10", None),
    ("SCORE: 0.5", None),
    ("", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_parse_vote():
    assert parse_vote("SCORE: 4\nCRITICAL: ROBIN") == "ROBIN"
    assert parse_vote("score 4. critical - brick, though ROBIN helped") == "BRICK"
    assert parse_vote("BRICK carried it") == "BRICK"
    assert parse_vote("both BRICK and ROBIN") is None
    assert parse_vote("nobody") is None


def test_split_interaction_reads_graph_text_and_meta():
    assert split_interaction("Task: add 2 and 2\nAnswer: 4\nsince 2+2=4", {}) == \
        ("add 2 and 2", "4\nsince 2+2=4")
    assert split_interaction("whatever", {"task": "T", "answer": "A"}) == ("T", "A")


class Judge:
    """ALFRED's scripted replies, in order; records the prompts it was shown."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts: list[str] = []

    def __call__(self, messages, model=None):
        self.prompts.append(messages[-1]["content"])
        return self.replies.pop(0) if self.replies else "SCORE: 1\nCRITICAL: BRICK"


class FakeFinetuner:
    running = False

    def __init__(self):
        self.calls = []

    def finetune(self, persona, dataset_path, *, steps=None):
        rows = [json.loads(l) for l in open(dataset_path, encoding="utf-8")]
        self.calls.append((persona, str(dataset_path), len(rows)))

        class R:
            def to_dict(self_inner):
                return {"persona": persona, "ok": True, "swapped": True, "rows": len(rows)}
        return R()


@pytest.fixture
def parts(settings, bus):
    from a4ps.memory import MemoryManager
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.models.manager import ModelManager
    from a4ps.models.scripted import ScriptedBackend
    from a4ps.proto import ProtoManager
    from a4ps.system import INVOKE_LLM
    judge = Judge([])
    embedder = HashEmbedder(dim=64)
    protos = ProtoManager(bus)
    protos.provide("models", ModelManager(settings, bus, backend=ScriptedBackend(judge),
                                          embedder=embedder))
    protos.create("persona", {"temperature": 0.0, "status": "idle"}, methods={"invoke_llm": INVOKE_LLM})
    for name in ("ALFRED", "BRICK", "ROBIN"):
        protos.clone("persona", name, model_name="scripted", system_prompt=f"You are {name}.")
    memory = MemoryManager(settings, embedder, bus=bus, auto_maintain=False)
    return settings, bus, protos, memory, judge


def _remember(memory, n, start=0):
    ids = []
    for i in range(start, start + n):
        ids.append(memory.add(f"Task: question {i}?\nAnswer: answer {i}.", kind="interaction",
                              persona="ALFRED", task_id=f"t{i}",
                              meta={"brick": f"brick view {i}", "robin": f"robin view {i}",
                                    "rounds": 2}))
        time.sleep(0.002)  # distinct timestamps: recency order is well defined
    return ids


def test_scores_threshold_and_golden_format(parts):
    settings, bus, protos, memory, judge = parts
    settings.curator.score_threshold = 4.0
    settings.curator.trigger_size = 100
    rec = EventRecorder(bus, "curator.scored")
    _remember(memory, 4)
    # newest first: question 3, 2, 1, 0
    judge.replies[:] = ["SCORE: 4.5\nCRITICAL: BRICK", "Score: 4\nCRITICAL: ROBIN",
                        "garbage", "7"]
    cur = Curator(settings, bus, protos, memory)
    report = cur.run_once()

    assert [s.score for s in report.scored] == [4.5, 4.0, None, None]
    assert [s.kept for s in report.scored] == [True, True, False, False]
    assert report.added == 2 and report.dataset_size == 2
    assert report.votes == {"BRICK": 1, "ROBIN": 1}
    assert len(rec.of("curator.scored")) == 4
    assert rec.of("curator.scored")[2].payload["score"] is None
    # the judge saw the rubric, the task, both persona turns and the final answer
    assert "logical rigour" in judge.prompts[0] and "question 3?" in judge.prompts[0]
    assert "brick view 3" in judge.prompts[0] and "answer 3." in judge.prompts[0]

    rows = [json.loads(l) for l in cur.golden_path.read_text().splitlines()]
    assert rows[0]["messages"] == [{"role": "user", "content": "question 3?"},
                                   {"role": "assistant", "content": "answer 3."}]
    assert rows[0]["meta"]["turns"] == {"BRICK": "brick view 3", "ROBIN": "robin view 3"}
    assert rows[0]["meta"]["score"] == 4.5 and rows[0]["meta"]["critical_persona"] == "BRICK"
    # every judged interaction (kept, unparseable, out of range) is marked curated
    assert memory.recent(10, uncurated_only=True, kind="interaction") == []


def test_no_double_counting_across_runs(parts):
    settings, bus, protos, memory, judge = parts
    settings.curator.trigger_size = 100
    _remember(memory, 2)
    judge.replies[:] = ["SCORE: 5\nCRITICAL: BRICK"] * 2
    cur = Curator(settings, bus, protos, memory)
    assert cur.run_once().added == 2
    judge.replies[:] = ["SCORE: 5\nCRITICAL: BRICK"] * 5
    second = cur.run_once()
    assert second.scored == [] and second.added == 0 and second.dataset_size == 2
    _remember(memory, 1, start=10)
    third = cur.run_once()
    assert [s.task_id for s in third.scored] == ["t10"]
    assert third.dataset_size == 3 and third.votes["BRICK"] == 3


def test_judge_error_leaves_interaction_for_next_pass(parts):
    settings, bus, protos, memory, judge = parts
    settings.curator.trigger_size = 100
    _remember(memory, 1)
    cur = Curator(settings, bus, protos, memory,
                  judge=lambda prompt: (_ for _ in ()).throw(RuntimeError("model down")))
    report = cur.run_once()
    assert report.scored[0].error and "model down" in report.scored[0].error
    assert len(memory.recent(10, uncurated_only=True, kind="interaction")) == 1
    cur2 = Curator(settings, bus, protos, memory, judge=lambda p: "SCORE: 5\nCRITICAL: ROBIN")
    assert cur2.run_once().added == 1


def test_trigger_finetunes_most_voted_persona_and_archives(parts):
    settings, bus, protos, memory, judge = parts
    settings.curator.trigger_size = 3
    settings.curator.batch_size = 2
    ft = FakeFinetuner()
    cur = Curator(settings, bus, protos, memory, finetuner=ft)
    _remember(memory, 4)
    judge.replies[:] = ["SCORE: 5\nCRITICAL: ROBIN", "SCORE: 4.5\nCRITICAL: BRICK"]
    first = cur.run_once()           # 2 samples < 3: no trigger
    assert not first.triggered and ft.calls == []
    judge.replies[:] = ["SCORE: 5\nCRITICAL: ROBIN", "SCORE: 4\nCRITICAL: ROBIN"]
    second = cur.run_once()          # 4 samples >= 3: ROBIN has 3 votes of 4
    assert second.triggered and second.persona == "ROBIN"
    assert second.votes == {"BRICK": 1, "ROBIN": 3}
    assert ft.calls and ft.calls[0][0] == "ROBIN" and ft.calls[0][2] == 4
    assert second.finetune["swapped"] is True
    # archived: the live golden file starts afresh, the archive holds the 4 samples
    assert not cur.golden_path.exists()
    archived = list(cur.archive_dir.glob("golden-*-ROBIN.jsonl"))
    assert len(archived) == 1 and len(archived[0].read_text().splitlines()) == 4
    assert cur.votes() == {"BRICK": 0, "ROBIN": 0}
    third = cur.run_once()
    assert not third.triggered and third.dataset_size == 0 and len(ft.calls) == 1


def test_thread_runs_passes_and_stops(parts):
    settings, bus, protos, memory, judge = parts
    settings.curator.interval_s = 0.05
    settings.curator.trigger_size = 100
    judge.replies[:] = ["SCORE: 4\nCRITICAL: BRICK"]
    rec = EventRecorder(bus, "curator.scored")
    cur = Curator(settings, bus, protos, memory)
    cur.start()
    try:
        _remember(memory, 1)
        rec.wait_for("curator.scored", timeout=20)
    finally:
        cur.stop()
    assert not cur.running
    assert cur.votes()["BRICK"] == 1


def test_cli_curate_lineage_rollback(tmp_path, monkeypatch, capsys):
    """`a4ps curate` scores through the real System (scripted models, hash embedder)."""
    from a4ps.cli import main
    from a4ps.config import load_settings
    from a4ps.system import System
    monkeypatch.setenv("A4PS_MODELS__BACKEND", "scripted")
    monkeypatch.setenv("A4PS_MODELS__EMBEDDING_BACKEND", "hash")
    data = tmp_path / "data"
    settings = load_settings(data_dir=data)
    with System(settings) as system:
        system.curator.stop()
        _remember(system.memory, 2)
    assert main(["--data-dir", str(data), "curate"]) == 0
    out = capsys.readouterr().out
    assert "task t1" in out and "task t0" in out and "golden set 0/" in out
    assert main(["--data-dir", str(data), "curate"]) == 0          # nothing new the 2nd time
    assert "nothing new" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "models", "lineage", "brick"]) == 0
    assert "no fine-tuned versions yet" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "models", "rollback", "BRICK"]) == 1
    assert "empty" in capsys.readouterr().err
