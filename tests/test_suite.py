"""The task suite: it loads, it is big and varied enough, a held-out portion is marked,
and every kind of check tells a right answer from a wrong one. The runner on scripted
models; on the real embedded model (slow) a small slice runs in every mode."""
from __future__ import annotations

import json

import pytest

import graph_parts
from a4ps.cognition import suite
from a4ps.cognition.suite import SuiteTask, check_answer, load_suite


def test_the_suite_has_at_least_60_tasks_of_every_kind_and_a_heldout_portion():
    tasks = load_suite()
    assert len(tasks) >= 60
    assert {t.kind for t in tasks} == set(suite.KINDS)
    heldout = load_suite(split="heldout")
    assert 15 <= len(heldout) <= len(tasks) // 2
    for kind in suite.KINDS:      # every kind is represented on both sides
        assert any(t.kind == kind for t in heldout)
        assert any(t.kind == kind and t.split == "tune" for t in tasks)
    assert len({t.id for t in tasks}) == len(tasks)


def test_a_broken_suite_line_is_refused_with_its_line_number(tmp_path):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"id": "x", "kind": "factual", "split": "tune", "text": "q", '
                   '"check": {"type": "guess"}}\n')
    with pytest.raises(suite.SuiteError, match=r"tasks.jsonl:1: check type"):
        load_suite(bad)


def task(check, text="What is 17 times 23?"):
    return SuiteTask("t", "arithmetic", "tune", text, check)


@pytest.mark.parametrize("answer, ok", [
    ("17 times 23 is 391.", True), ("391", True), ("The answer is 391.", True),
    ("17 times 23 is 321.", False), ("Seventeen twenty-three.", False), ("", False),
    ("17 times 23 is 391. " * 5, True),
])
def test_numeric_check_reads_the_first_new_number(answer, ok):
    assert check_answer(task({"type": "numeric", "value": 391, "tol": 0}), answer).passed is ok


def test_numeric_check_tolerance_and_number_words():
    conv = task({"type": "numeric", "value": 8.047, "tol": 0.01}, "Convert 5 miles to kilometers.")
    assert check_answer(conv, "5 miles is about 8.05 kilometers.").passed
    assert not check_answer(conv, "5 miles is 5 kilometers, roughly 9 km.").passed
    legs = task({"type": "numeric", "value": 8, "tol": 0}, "How many legs does a spider have?")
    assert check_answer(legs, "A spider has eight legs.").passed


@pytest.mark.parametrize("check, answer, ok", [
    ({"type": "regex", "pattern": r"(?i)\bparis\b"}, "The capital is Paris.", True),
    ({"type": "regex", "pattern": r"(?i)\bparis\b"}, "The capital is Lyon.", False),
    ({"type": "words", "max": 2}, "Green.", True),
    ({"type": "words", "max": 2}, "Grass is green.", False),
    ({"type": "sentences", "max": 1}, "We need sleep to rest.", True),
    ({"type": "sentences", "max": 1}, "We sleep. It helps.", False),
    ({"type": "list", "min": 3, "max": 3}, "apple, banana, cherry", True),
    ({"type": "list", "min": 3, "max": 3}, "apple and banana", False),
    ({"type": "json", "schema": {"type": "object", "properties": {"answer": {"type": "number"}},
                                 "required": ["answer"]}, "pattern": "4"}, '{"answer": 4}', True),
    ({"type": "json", "schema": {"type": "object", "properties": {"answer": {"type": "number"}},
                                 "required": ["answer"]}}, '{"answer": "four"}', False),
    ({"type": "json", "schema": {"type": "object", "properties": {"answer": {"type": "number"}},
                                 "required": ["answer"]}}, "answer: 4", False),
    ({"type": "all", "checks": [{"type": "words", "max": 1}, {"type": "regex", "pattern": "12"}]},
     "12", True),
    ({"type": "all", "checks": [{"type": "words", "max": 1}, {"type": "regex", "pattern": "12"}]},
     "twelve", False),
])
def test_checks_tell_right_from_wrong(check, answer, ok):
    assert check_answer(task(check), answer).passed is ok


def test_rubric_counts_items_and_an_absent_item_fails_on_harshness():
    [t] = [x for x in load_suite() if x.id == "empathy-01"]
    kind = "I'm sorry, that sounds hard. Many people pass on the next try; practice and try again."
    harsh = "It's your fault, get over it."
    good, bad = check_answer(t, kind), check_answer(t, harsh)
    assert good.passed and good.score == 1.0
    assert not bad.passed and bad.score < 0.5


def test_reference_answers_pass_and_wrong_ones_fail_across_the_suite():
    """A right and a wrong answer for a sample of every kind."""
    cases = {
        "factual-01": ("Paris is the capital of France.", "Lyon."),
        "factual-10": ("A spider has 8 legs.", "A spider has 6 legs."),
        "arithmetic-01": ("17 times 23 is 391.", "17 times 23 is 321."),
        "conversion-02": ("100 F is about 37.8 C.", "100 F is 100 C."),
        "reasoning-01": ("Bob is the shortest.", "Ann is the shortest."),
        "reasoning-03": ("The answer is yes.", "No, yes... no."),
        "format-02": ('{"city": "Paris", "country": "France"}', "Paris, France"),
        "format-04": ("apple, pear, plum", "apple"),
    }
    by_id = {t.id: t for t in load_suite()}
    for tid, (right, wrong) in cases.items():
        assert check_answer(by_id[tid], right).passed, (tid, right)
        assert not check_answer(by_id[tid], wrong).passed, (tid, wrong)


def test_runner_on_scripted_models_records_answers_costs_and_decisions(settings, bus):
    parts = graph_parts.build(settings, bus, graph_parts.script(
        route="contrapunto", brick="Paris is the capital of France.",
        robin="Paris is the capital of France.", answer="Lyon."), memory=False, checkpoints=False)
    runner = suite.SuiteRunner(parts.graph, parts.models, parts.protos)
    [t] = [x for x in load_suite() if x.id == "factual-01"]
    c = runner.run(t, "contrapunto")
    s = runner.run(t, "single")
    b = runner.run(t, "brick")
    assert c["passed"] and c["source"] == "agreement" and c["route"] == "contrapunto"
    assert c["decisions"][0]["parsed"] and c["tokens"] > 0 and c["wall_s"] > 0
    assert not s["passed"] and s["answer"] == "Lyon." and s["decisions"] == []
    assert b["passed"] and b["answer"] == "Paris is the capital of France."
    assert c["repetition_filled"] == [] and json.dumps(c)
    with pytest.raises(ValueError, match="mode must be one of"):
        runner.run(t, "solo")


def test_echoing_the_task_earns_no_credit():
    [t] = [x for x in load_suite() if x.id == "empathy-01"]
    assert not check_answer(t, f"Brick reflects on the task: {t.text}").passed


@pytest.mark.slow
@pytest.mark.timeout(1800)      # nine real-model runs; minutes on a busy 2-core machine
def test_suite_slice_on_the_real_model_in_every_mode(settings, bus, embedded_models):
    """One task of three kinds through the contrapunto, the single call and BRICK alone
    on SmolLM2-135M: verdicts and costs are recorded, the route decision parses, and no
    turn's budget is filled by repetition."""
    from a4ps.cognition.graph import CognitiveGraph
    protos = graph_parts.seed_personas(bus, embedded_models, model_name="smollm2-135m")
    graph = CognitiveGraph(protos, embedded_models, None, bus, settings,
                           checkpointer_path=False, turn_max_tokens=24)
    runner = suite.SuiteRunner(graph, embedded_models, protos)
    picked = {t.kind: t for t in reversed(load_suite()) if t.kind in
              ("factual", "arithmetic", "empathy")}
    rows = [runner.run(t, mode) for t in picked.values() for mode in suite.MODES]
    assert len(rows) == 9
    for r in rows:
        assert r["wall_s"] > 0 and isinstance(r["passed"], bool) and r["detail"]
        assert r["repetition_filled"] == [], r
        assert all(t.get("finish") in ("eos", "stop", "length", "repetition")
                   for t in r["turns"]), r["turns"]
    graph_rows = [r for r in rows if r["mode"] == "contrapunto"]
    assert all(r["decisions"][0]["kind"] == "route" and r["decisions"][0]["parsed"]
               for r in graph_rows)
    assert all(r["tokens"] > 0 for r in rows if r["status"] == "ok")
