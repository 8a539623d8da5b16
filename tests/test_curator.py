"""Curator: ALFRED's constrained judgement, threshold, no double counting, votes, the
trigger, clean training data (only user-originated interactions, near-duplicates
collapsed) and the held-out evaluation rows (routed by content hash, never both).

Real parts: EventBus, ProtoManager, ModelManager on the scripted backend (ALFRED's
decisions, one script entry per decision), LanceDB memory with the hash embedder, the
real Judge. The fine-tuner is a recording stand-in here; tests/test_finetune.py runs
the real one.
"""
from __future__ import annotations

import json
import time

import pytest

from a4ps.events import EventRecorder
from a4ps.fine_tuning.eval_set import EvalSet, content_key, routes_to_eval
from a4ps.services.curator_service import Curator, interaction_origin, split_interaction


def test_split_interaction_reads_graph_text_and_meta():
    assert split_interaction("Task: add 2 and 2\nAnswer: 4\nsince 2+2=4", {}) == \
        ("add 2 and 2", "4\nsince 2+2=4")
    assert split_interaction("whatever", {"task": "T", "answer": "A"}) == ("T", "A")


def test_interaction_origin_reads_meta_and_old_rows():
    assert interaction_origin({"origin": "user"}) == "user"
    assert interaction_origin({"origin": "motivator", "kind": "goal"}) == "motivator"
    # rows stored before the origin was: the task's kind tells
    assert interaction_origin({"kind": "goal"}) == "motivator"
    assert interaction_origin({"kind": "reflection"}) == "reflection"
    assert interaction_origin({}) == "user"


class Judge:
    """ALFRED's scripted decisions, in order (a score, then a vote when it scored);
    records the prompts it was shown."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts: list[str] = []

    def __call__(self, messages, model=None):
        self.prompts.append(messages[-1]["content"])
        return self.replies.pop(0) if self.replies else "1"


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


def _remember(memory, n, start=0, origin="user"):
    ids = []
    for i in range(start, start + n):
        ids.append(memory.add(f"Task: question {i}?\nAnswer: answer {i}.", kind="interaction",
                              persona="ALFRED", task_id=f"t{i}",
                              meta={"brick": f"brick view {i}", "robin": f"robin view {i}",
                                    "rounds": 2, "origin": origin}))
        time.sleep(0.002)  # distinct timestamps: recency order is well defined
    return ids


@pytest.fixture
def no_eval(parts):
    """Every admitted row goes to the golden set (the routing has its own test)."""
    parts[0].curator.eval_fraction = 0.0
    return parts


def test_scores_threshold_and_golden_format(no_eval):
    settings, bus, protos, memory, judge = no_eval
    settings.curator.score_threshold = 4.0
    settings.curator.trigger_size = 100
    rec = EventRecorder(bus, "curator.scored")
    _remember(memory, 4)
    # newest first: question 3, 2, 1, 0; a score, then a vote for the kept ones
    judge.replies[:] = ["5", "BRICK", "4", "ROBIN", "garbage", "3"]
    cur = Curator(settings, bus, protos, memory)
    report = cur.run_once()

    assert [s.score for s in report.scored] == [5.0, 4.0, None, 3.0]
    assert [s.kept for s in report.scored] == [True, True, False, False]
    assert [s.vote for s in report.scored] == ["BRICK", "ROBIN", None, None]
    assert report.scored[2].error and "DecisionError" in report.scored[2].error
    assert report.added == 2 and report.dataset_size == 2
    assert report.votes == {"BRICK": 1, "ROBIN": 1}
    assert len(rec.of("curator.scored")) == 4
    assert rec.of("curator.scored")[2].payload["score"] is None
    # the judge saw the rubric, the task, both persona turns and the final answer,
    # and was asked for a digit, then for a name
    assert "logical rigour" in judge.prompts[0] and "question 3?" in judge.prompts[0]
    assert "brick view 3" in judge.prompts[0] and "answer 3." in judge.prompts[0]
    assert "one digit" in judge.prompts[0] and "one name" in judge.prompts[1]

    rows = [json.loads(l) for l in cur.golden_path.read_text().splitlines()]
    assert rows[0]["messages"] == [{"role": "user", "content": "question 3?"},
                                   {"role": "assistant", "content": "answer 3."}]
    assert rows[0]["meta"]["turns"] == {"BRICK": "brick view 3", "ROBIN": "robin view 3"}
    assert rows[0]["meta"]["score"] == 5.0 and rows[0]["meta"]["critical_persona"] == "BRICK"
    assert rows[0]["meta"]["origin"] == "user"
    # every judged interaction (kept, no decision, below the threshold) is marked curated
    assert memory.recent(10, uncurated_only=True, kind="interaction") == []


def test_no_double_counting_across_runs(no_eval):
    settings, bus, protos, memory, judge = no_eval
    settings.curator.trigger_size = 100
    _remember(memory, 2)
    judge.replies[:] = ["5", "BRICK"] * 2
    cur = Curator(settings, bus, protos, memory)
    assert cur.run_once().added == 2
    judge.replies[:] = ["5", "BRICK"] * 5
    second = cur.run_once()
    assert second.scored == [] and second.added == 0 and second.dataset_size == 2
    _remember(memory, 1, start=10)
    third = cur.run_once()
    assert [s.task_id for s in third.scored] == ["t10"]
    assert third.dataset_size == 3 and third.votes["BRICK"] == 3


class BrokenJudge:
    def score(self, task, answer, turns=None):
        from a4ps.models.errors import ModelError
        raise ModelError("model down")


def test_judge_error_leaves_interaction_for_next_pass(no_eval):
    settings, bus, protos, memory, judge = no_eval
    settings.curator.trigger_size = 100
    _remember(memory, 1)
    cur = Curator(settings, bus, protos, memory, judge=BrokenJudge())
    report = cur.run_once()
    assert report.scored[0].error and "model down" in report.scored[0].error
    assert len(memory.recent(10, uncurated_only=True, kind="interaction")) == 1
    judge.replies[:] = ["5", "ROBIN"]
    cur2 = Curator(settings, bus, protos, memory)
    assert cur2.run_once().added == 1


def test_trigger_finetunes_most_voted_persona_and_archives(no_eval):
    settings, bus, protos, memory, judge = no_eval
    settings.curator.trigger_size = 3
    settings.curator.batch_size = 2
    ft = FakeFinetuner()
    cur = Curator(settings, bus, protos, memory, finetuner=ft)
    _remember(memory, 4)
    judge.replies[:] = ["5", "ROBIN", "5", "BRICK"]
    first = cur.run_once()           # 2 samples < 3: no trigger
    assert not first.triggered and ft.calls == []
    judge.replies[:] = ["5", "ROBIN", "4", "ROBIN"]
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


def _mixed(memory):
    """Interactions of every origin, as the graph stores them (origin in the meta)."""
    for i, origin in enumerate(["user", "motivator", "user", "reflection", "user"]):
        kind = {"motivator": "goal", "reflection": "reflection"}.get(origin)
        meta = {"origin": origin, **({"kind": kind} if kind else {})}
        memory.add(f"Task: {origin} task {i}?\nAnswer: {origin} answer {i}.", kind="interaction",
                   persona="ALFRED", task_id=f"m{i}", meta=meta)
        time.sleep(0.002)
    # an old row without an origin, from a goal: its task's kind still tells
    memory.add("Task: an old goal?\nAnswer: old goal answer.", kind="interaction",
               persona="ALFRED", task_id="old", meta={"kind": "goal", "trigger": "idle"})


def test_only_user_interactions_are_admitted_by_default(no_eval):
    settings, bus, protos, memory, judge = no_eval
    settings.curator.trigger_size = 100
    _mixed(memory)
    judge.replies[:] = ["5", "BRICK"] * 10
    cur = Curator(settings, bus, protos, memory)
    report = cur.run_once()
    judged = [s for s in report.scored if s.skipped is None]
    assert sorted(s.task_id for s in judged) == ["m0", "m2", "m4"]
    assert all(s.origin == "user" for s in judged)
    skipped = {s.task_id: s.skipped for s in report.scored if s.skipped}
    assert set(skipped) == {"m1", "m3", "old"} and report.skipped == {"origin": 3}
    assert "motivator" in skipped["m1"] and "admit_origins" in skipped["m1"]
    golden = "\n".join(cur.golden_path.read_text().splitlines())
    assert "user task" in golden and "motivator" not in golden and "reflection" not in golden
    assert len(judge.prompts) == 6                 # the judge never saw the others
    # the skipped ones are done with: a second pass does not look at them again
    assert cur.run_once().scored == []


def test_a_setting_admits_goals_and_reflections(no_eval):
    settings, bus, protos, memory, judge = no_eval
    settings.curator.trigger_size = 100
    settings.curator.admit_origins = ["user", "motivator", "reflection"]
    _mixed(memory)
    judge.replies[:] = ["5", "BRICK"] * 10
    report = Curator(settings, bus, protos, memory).run_once()
    assert report.added == 6 and not report.skipped


def test_near_duplicates_are_collapsed(no_eval):
    settings, bus, protos, memory, judge = no_eval
    settings.curator.trigger_size = 100
    memory.add("Task: What is the capital of France?\nAnswer: Paris is the capital.",
               kind="interaction", task_id="a", meta={"origin": "user"})
    time.sleep(0.002)
    memory.add("Task: what is the capital of France\nAnswer: Paris is the capital",
               kind="interaction", task_id="b", meta={"origin": "user"})        # same, spaced
    time.sleep(0.002)
    memory.add("Task: How tall is Everest?\nAnswer: About 8849 metres.",
               kind="interaction", task_id="c", meta={"origin": "user"})
    judge.replies[:] = ["5", "BRICK"] * 5
    report = Curator(settings, bus, protos, memory).run_once()
    by_task = {s.task_id: s for s in report.scored}
    assert by_task["c"].kept and by_task["b"].kept          # newest first: b, then a
    assert by_task["a"].skipped and "near-duplicate" in by_task["a"].skipped
    assert report.added == 2 and report.skipped == {"duplicate": 1}


def test_kept_rows_are_routed_by_content_hash_to_train_or_eval(parts):
    settings, bus, protos, memory, judge = parts
    settings.curator.trigger_size = 100
    settings.curator.batch_size = 50
    settings.curator.eval_fraction = 0.3
    _remember(memory, 30)
    judge.replies[:] = ["5", "BRICK"] * 40
    cur = Curator(settings, bus, protos, memory)
    report = cur.run_once()
    golden = [json.loads(l) for l in cur.golden_path.read_text().splitlines()]
    held = EvalSet(settings.golden_dir).rows()
    assert len(golden) + len(held) == 30 and 3 <= len(held) <= 18
    assert report.added == len(golden) and report.held_out == len(held)
    assert report.eval_size == len(held) and report.dataset_size == len(golden)
    for row in golden + held:      # the route is the hash's, reproducibly
        task = row["messages"][0]["content"]
        assert routes_to_eval(content_key(task), 0.3) == (row in held)
        assert row["meta"]["key"] == content_key(task)
    assert not {r["meta"]["key"] for r in golden} & {r["meta"]["key"] for r in held}
    assert {s.route for s in report.scored} == {"train", "eval"}
    # the same task asked again lands on the same side: never in both
    settings.curator.dedup_similarity = 1.0
    again = held[0]["messages"][0]["content"]
    memory.add(f"Task: {again.upper()}\nAnswer: a different answer.", kind="interaction",
               task_id="again", meta={"origin": "user"})
    judge.replies[:] = ["5", "ROBIN"]
    second = cur.run_once()
    assert second.scored[0].route == "eval" and second.held_out == 1 and second.added == 0


def test_eval_rows_are_not_archived_with_the_golden_set(parts):
    settings, bus, protos, memory, judge = parts
    settings.curator.trigger_size = 2
    settings.curator.batch_size = 50
    settings.curator.eval_fraction = 0.5
    ft = FakeFinetuner()
    _remember(memory, 12)
    judge.replies[:] = ["5", "BRICK"] * 20
    cur = Curator(settings, bus, protos, memory, finetuner=ft)
    report = cur.run_once()
    assert report.triggered and report.held_out >= 1
    held = EvalSet(settings.golden_dir).rows()
    assert len(held) == report.held_out                      # still there, frozen
    trained = [json.loads(l) for l in open(report.archived_to)]
    assert not {r["meta"]["key"] for r in trained} & {r["meta"]["key"] for r in held}


def test_thread_runs_passes_and_stops(no_eval):
    settings, bus, protos, memory, judge = no_eval
    settings.curator.interval_s = 0.05
    settings.curator.trigger_size = 100
    judge.replies[:] = ["4", "BRICK"]
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
        system.memory.add("Task: How do clocks work?\nAnswer: " + "Clocks tick. " * 4,
                          kind="interaction", persona="ALFRED", task_id="loop",
                          meta={"origin": "user"})
    assert main(["--data-dir", str(data), "curate"]) == 0
    out = capsys.readouterr().out
    assert "task t1" in out and "task t0" in out and "golden set 0/" in out
    # why the looping answer was not kept is printed
    assert "score 1.00" in out and "not kept: a sentence repeated 4 times" in out
    assert main(["--data-dir", str(data), "curate"]) == 0          # nothing new the 2nd time
    assert "nothing new" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "models", "lineage", "brick"]) == 0
    assert "no fine-tuned versions yet" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "models", "rollback", "BRICK"]) == 1
    assert "empty" in capsys.readouterr().err


def test_why_an_interaction_was_not_kept_is_recorded(no_eval):
    """A failed cheap check (here a repetition loop) rejects without asking ALFRED and
    says why; a low score says it was below the threshold; both reach the event."""
    settings, bus, protos, memory, judge = no_eval
    settings.curator.score_threshold = 4.0
    rec = EventRecorder(bus, "curator.scored")
    memory.add("Task: How does a bridge work?\nAnswer: " + "A bridge is a bridge. " * 5,
               kind="interaction", persona="ALFRED", task_id="loop", meta={"origin": "user"})
    time.sleep(0.002)
    memory.add("Task: Name a colour.\nAnswer: Blue is a colour.", kind="interaction",
               persona="ALFRED", task_id="low", meta={"origin": "user"})
    judge.replies[:] = ["2"]                # only the second is put to ALFRED
    report = Curator(settings, bus, protos, memory).run_once()
    low, loop = report.scored                # newest first
    assert loop.kept is False and loop.score == 1.0 and loop.flags == ["loop"]
    assert "repeated 5 times" in loop.reason and loop.method == "checks"
    assert low.kept is False and low.score == 2.0 and "below the threshold 4" in low.reason
    assert len(judge.prompts) == 1 and "Name a colour." in judge.prompts[0]
    events = {e.payload["task_id"]: e.payload for e in rec.of("curator.scored")}
    assert events["loop"]["flags"] == ["loop"] and "repeated" in events["loop"]["reason"]
    assert "below the threshold" in events["low"]["reason"]
    assert report.added == 0
