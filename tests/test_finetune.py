"""The persona forge: real CPU fine-tunes (TRL+PEFT) of the embedded SmolLM2, the
evaluation gate (held-out rows training never sees, the capability suite, ALFRED's
constrained judgement), the cognitive atomic swap, rollback, the Ollama swap path,
and training crashes.

Slow tests train for real in the child process; they share the dequantized base
checkpoint with the model tests. The two the issue names run at the *default*
recipe: ten rows of random words (5 and 20 steps) must be refused, a narrow learnable
task with its own held-out items must be accepted.
"""
from __future__ import annotations

import json
import os
import random
import signal
import string
import threading
from pathlib import Path

import pytest

from a4ps.events import EventRecorder
from a4ps.fine_tuning.eval_set import SUITE_DIR, EvalSet, content_key, load_suite
from a4ps.fine_tuning.evaluation import (Comparison, GatePolicy, JudgeEvidence, compare_set,
                                         decide, paired_bootstrap)
from a4ps.fine_tuning.unsloth_forge import (FinetuneError, PersonaFinetuner, eval_items,
                                            read_golden)

TOPICS = ["rain", "coffee", "chess", "the moon", "bridges", "music", "gardens", "trains",
          "clocks", "maps", "owls", "bread"]
MARK = "BATCAVE PROTOCOL"
WORDS = """apple river stone cloud window garden yellow seven quickly paper north silver engine
basket pencil mountain whisper orange kettle ladder candle forest button tiger violin copper
marble rabbit ocean saddle tunnel velvet wagon zebra anchor bottle castle desert feather glove
harbor island jacket lemon meadow needle oyster pillow quartz rocket shadow thunder umbrella
valley walnut yarn blanket circle dragon eagle falcon guitar hammer igloo jungle kitten
lantern mirror nickel orbit parrot quiver ribbon spider tomato unicorn vessel willow""".split()
# a narrow, learnable task: a fixed answer style for one kind of request
PLACES = ("the engine room|the north gate|the water supply|the library|the kitchen|the garage|"
          "the radio mast|the greenhouse|the power grid|the east tunnel|the archive|the workshop|"
          "the boiler|the roof|the server rack|the cellar|the lift|the bridge deck|the vault|"
          "the armoury|the landing pad|the hangar|the pantry|the observatory|the laboratory|"
          "the garden wall|the west wing|the fuel depot|the clock tower|the chapel|the stables|"
          "the training hall").split("|")
# what real users asked and the curator held out (short factual answers)
HELD_OUT = [("What is the capital of Spain?", "The capital of Spain is Madrid."),
            ("How many legs does a spider have?", "A spider has eight legs."),
            ("What is 6 times 7?", "6 times 7 is 42."),
            ("What gas do plants take in?", "Plants take in carbon dioxide."),
            ("How many hours are in a day?", "There are 24 hours in a day."),
            ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
            ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
            ("What is 100 minus 37?", "100 minus 37 is 63.")]


def _rows(pairs):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def golden(path: Path, topics=TOPICS) -> Path:
    return _write(path, _rows([(f"Tell me about {t}.", f"{MARK}: {t} is a logical system.")
                               for t in topics]))


def random_words(path: Path, n=10, seed=0) -> Path:
    """Ten rows of random words (the issue's noise case)."""
    rnd = random.Random(seed)
    words = lambda k: " ".join(rnd.choice(WORDS) for _ in range(k))
    return _write(path, _rows([(words(8), words(16)) for _ in range(n)]))


def status_reports(places):
    return _rows([(f"Give the status report for {p}.",
                   f"STATUS REPORT: {p} is secure. No anomalies. End of report.") for p in places])


def small_suite(root: Path, persona: str = "BRICK", n: int = 2) -> Path:
    """A capability-suite directory holding the first ``n`` items of the persona's
    shipped suite, for tests about something other than the suite: the training child
    scores every suite item before and after training (16 for BRICK)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = (SUITE_DIR / f"{persona}.jsonl").read_text(encoding="utf-8").splitlines()
    (root / f"{persona}.jsonl").write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    return root


def noise(path: Path, n=8, seed=0) -> Path:
    rnd = random.Random(seed)
    junk = lambda: "".join(rnd.choice(string.ascii_letters + string.digits + "#@%&") for _ in range(60))
    return _write(path, [{"messages": [{"role": "user", "content": junk()},
                                       {"role": "assistant", "content": junk()}]} for _ in range(n)])


# -- fast: data handling, the gate's rule, lineage bookkeeping ----------------------------

def test_read_golden_skips_bad_lines(tmp_path):
    p = golden(tmp_path / "g.jsonl")
    with open(p, "a") as fh:
        fh.write("not json\n{\"messages\": [{\"role\": \"user\", \"content\": \"no answer\"}]}\n")
    assert len(read_golden(p)) == len(TOPICS)


def test_every_persona_ships_a_capability_suite():
    for persona in ("ALFRED", "BRICK", "ROBIN"):
        suite = load_suite(persona)
        assert len(suite) >= 10, persona
        assert len({i.id for i in suite}) == len(suite)
        assert len({i.skill for i in suite}) >= 4           # covers the role, not one trick
    assert load_suite("NOBODY") == []


def test_eval_items_are_held_out_rows_then_the_suite(tmp_path):
    items = eval_items("BRICK", _rows(HELD_OUT[:3] + HELD_OUT[:1]))
    held = [i for i in items if i["set"] == "heldout"]
    assert [i["user"] for i in held] == [q for q, _ in HELD_OUT[:3]]   # duplicates once
    assert len(items) - len(held) == len(load_suite("BRICK"))


def test_paired_bootstrap_separates_a_consistent_gain_from_none():
    same = paired_bootstrap([2.0, 1.5, 3.0, 2.2], [2.0, 1.5, 3.0, 2.2])
    assert same == (0.0, 0.0, 0.0)
    gain, lo, hi = paired_bootstrap([2.0, 1.5, 3.0, 2.2, 1.8], [1.0, 0.8, 1.4, 1.1, 0.9])
    assert 0.45 < lo <= gain <= hi < 0.55
    # half better, half worse by as much: the interval straddles zero
    g, lo, hi = paired_bootstrap([2.0, 2.0, 2.0, 2.0, 2.0, 2.0], [1.0, 3.0, 1.0, 3.0, 1.0, 3.0])
    assert lo < 0 < hi and g == pytest.approx(0.0)


def _items(name, cur, new):
    return ([{"id": str(i), "set": name, "loss": c} for i, c in enumerate(cur)],
            [{"id": str(i), "set": name, "loss": n} for i, n in enumerate(new)])


def _cmp(held=None, suite=None, judge=None):
    cmp = Comparison("live", "candidate")
    if held:
        cmp.heldout = compare_set("heldout", *_items("heldout", *held))
    if suite:
        cmp.suite = compare_set("suite", *_items("suite", *suite))
    cmp.judge = judge
    return cmp


SUITE_SAME = ([1.0, 1.2, 0.8, 1.5], [1.0, 1.2, 0.8, 1.5])
POLICY = GatePolicy(judge_samples=0)


def test_gate_accepts_a_gain_beyond_its_noise():
    cmp = decide(_cmp(held=([3.5, 3.4, 3.6, 3.5, 3.3], [2.3, 2.4, 2.2, 2.5, 2.3]),
                      suite=SUITE_SAME), POLICY)
    assert cmp.passed, cmp.reason
    assert [c["check"] for c in cmp.checks] == ["improvement", "capability suite"]
    assert "better beyond its noise" in cmp.reason and "CI" in cmp.reason
    assert cmp.heldout.ci_low > 0.1 and len(cmp.heldout.items) == 5


def test_gate_refuses_a_small_consistent_gain():
    """What ten rows of random words do (every item a little better, by the format)."""
    cmp = decide(_cmp(held=([1.30, 1.40, 1.20, 1.50, 1.35, 1.25], [1.25, 1.36, 1.15, 1.44, 1.30, 1.20]),
                      suite=SUITE_SAME), POLICY)
    assert not cmp.passed and "not better beyond its noise" in cmp.reason
    assert cmp.heldout.ci_low > 0               # a "significant" gain, and still refused


def test_gate_refuses_a_gain_that_may_be_noise():
    cmp = decide(_cmp(held=([2.0, 2.0, 2.0, 2.0, 2.0], [0.5, 2.5, 0.6, 2.6, 2.4]),
                      suite=SUITE_SAME), POLICY)
    assert not cmp.passed and cmp.heldout.ci_low < 0.1 < cmp.heldout.gain


def test_gate_refuses_a_regression_on_the_capability_suite():
    cmp = decide(_cmp(held=([3.5, 3.4, 3.6, 3.5], [1.0, 1.1, 0.9, 1.0]),
                      suite=([1.0, 1.2, 0.8, 1.5], [1.2, 1.3, 0.9, 1.6])), POLICY)
    assert not cmp.passed and "capability suite" in cmp.reason
    assert [c["passed"] for c in cmp.checks] == [True, False]


def test_gate_refuses_without_enough_held_out_items():
    assert "at least 4" in decide(_cmp(suite=SUITE_SAME), POLICY).reason
    few = decide(_cmp(held=([3.0, 3.0, 3.0], [1.0, 1.0, 1.0]), suite=SUITE_SAME), POLICY)
    assert not few.passed and "only 3" in few.reason


GOOD = ([3.5, 3.4, 3.6, 3.5], [1.0, 1.1, 0.9, 1.0])


def test_an_unparseable_judge_is_no_evidence_never_a_pass():
    policy = GatePolicy(judge_samples=3)
    none = decide(_cmp(held=GOOD, suite=SUITE_SAME, judge=JudgeEvidence(asked=3, scored=0)), policy)
    assert not none.passed and "no evidence" in none.reason
    missing = decide(_cmp(held=GOOD, suite=SUITE_SAME), policy)        # never asked
    assert not missing.passed and "no evidence" in missing.reason


def test_a_judge_surely_worse_refuses_and_a_noisy_one_does_not():
    policy = GatePolicy(judge_samples=3)

    def judged(pairs):
        return JudgeEvidence(asked=len(pairs), scored=len(pairs),
                             current_mean=sum(a for a, _ in pairs) / len(pairs),
                             new_mean=sum(b for _, b in pairs) / len(pairs),
                             samples=[{"current_score": a, "new_score": b} for a, b in pairs])
    worse = decide(_cmp(held=GOOD, suite=SUITE_SAME, judge=judged([(4, 2), (5, 3), (4, 3)])), policy)
    assert not worse.passed and "ALFRED 4.33 -> 2.67" in worse.reason
    noisy = decide(_cmp(held=GOOD, suite=SUITE_SAME, judge=judged([(4, 1), (2, 4), (3, 2)])), policy)
    assert noisy.passed, noisy.reason
    assert [c["check"] for c in noisy.checks] == ["improvement", "capability suite", "judge"]


def test_comparison_numbers_keep_every_figure_for_the_lineage():
    cmp = decide(_cmp(held=GOOD, suite=SUITE_SAME), POLICY)
    nums = cmp.numbers()
    assert nums["heldout"]["ci_low"] == cmp.heldout.ci_low and "items" not in nums["heldout"]
    assert nums["suite"]["n"] == 4 and nums["passed"] is True and nums["checks"]
    json.dumps(nums)


@pytest.fixture
def scripted_parts(settings, bus):
    from a4ps.models.embeddings import HashEmbedder
    from a4ps.models.manager import ModelManager
    from a4ps.models.scripted import ScriptedBackend
    from a4ps.proto import ProtoManager
    from a4ps.system import INVOKE_LLM
    protos = ProtoManager(bus)
    models = ModelManager(settings, bus, backend=ScriptedBackend(["SCORE: 4"]),
                          embedder=HashEmbedder(dim=32))
    protos.provide("models", models)
    protos.create("persona", {"temperature": 0.0}, methods={"invoke_llm": INVOKE_LLM})
    for name in ("ALFRED", "BRICK", "ROBIN"):
        protos.clone("persona", name, model_name="smollm2-135m", model_backend="embedded",
                     system_prompt=f"You are {name}.", model_lineage=[])
    return settings, bus, protos, models


def test_rollback_walks_back_the_lineage(scripted_parts, tmp_path):
    settings, bus, protos, models = scripted_parts
    ft = PersonaFinetuner(settings, bus, protos, models)
    with pytest.raises(FinetuneError, match="empty"):
        ft.rollback("BRICK")
    dirs = []
    for v in (1, 2):
        d = tmp_path / f"v{v}"
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        dirs.append(d)
    lineage = [
        {"version": 0, "model_name": "smollm2-135m", "status": "superseded", "is_base": True,
         "backend": "embedded", "adapter_dir": None},
        {"version": 1, "model_name": f"smollm2-135m+lora:{dirs[0]}", "status": "superseded",
         "backend": "embedded", "adapter_dir": str(dirs[0])},
        {"version": 2, "model_name": "x", "status": "rejected", "backend": "embedded"},
        {"version": 3, "model_name": f"smollm2-135m+lora:{dirs[1]}", "status": "live",
         "backend": "embedded", "adapter_dir": str(dirs[1])},
    ]
    protos.update("BRICK", {"model_name": lineage[3]["model_name"], "model_lineage": lineage})
    rec = EventRecorder(bus, "model.swapped")
    out = ft.rollback("BRICK")
    assert out["version"] == 1 and protos.get("BRICK").model_name == lineage[1]["model_name"]
    assert [e["status"] for e in protos.get("BRICK").model_lineage] == \
        ["superseded", "live", "rejected", "rolled_back"]
    assert rec.of("model.swapped")[-1].payload["rollback"] is True
    ft.rollback("BRICK")
    assert protos.get("BRICK").model_name == "smollm2-135m"
    with pytest.raises(FinetuneError, match="first version"):
        ft.rollback("BRICK")
    # a hand-edited model_name is not silently overwritten
    protos.update("BRICK", {"model_name": "something-else"})
    with pytest.raises(FinetuneError, match="by hand"):
        ft.rollback("BRICK")


def test_bad_requests_are_reported_not_raised(scripted_parts, tmp_path):
    settings, bus, protos, models = scripted_parts
    ft = PersonaFinetuner(settings, bus, protos, models)
    r = ft.finetune("NOBODY", golden(tmp_path / "g.jsonl"))
    assert not r.ok and "no persona proto" in r.reason
    r = ft.finetune("BRICK", tmp_path / "missing.jsonl")
    assert not r.ok and "does not exist" in r.reason
    assert protos.get("BRICK").model_name == "smollm2-135m"


# -- slow: real training in the child process ----------------------------------------------

@pytest.fixture
def tiny_recipe(settings, model_cache_dir):
    """Settings for a fast real fine-tune: batch 1, short samples, a few steps."""
    settings.models = settings.models.model_copy(update={"embedded": settings.models.embedded.model_copy(
        update={"cache_dir": model_cache_dir})})
    ft = settings.finetune
    ft.batch_size, ft.grad_accum, ft.max_length = 1, 1, 96
    ft.warmup_steps, ft.judge_samples = 1, 0
    ft.timeout_s = 600
    return settings


@pytest.fixture
def default_recipe(settings, model_cache_dir):
    """The shipped fine-tune recipe and gate, untouched (only the model cache is shared)."""
    settings.models = settings.models.model_copy(update={"embedded": settings.models.embedded.model_copy(
        update={"cache_dir": model_cache_dir})})
    return settings


def _personas(settings, bus, models):
    from a4ps.proto import ProtoManager
    from a4ps.system import INVOKE_LLM
    protos = ProtoManager(bus)
    protos.provide("models", models)
    protos.create("persona", {"temperature": 0.0}, methods={"invoke_llm": INVOKE_LLM})
    for name in ("ALFRED", "BRICK", "ROBIN"):
        protos.clone("persona", name, model_name="smollm2-135m", model_backend="embedded",
                     system_prompt=f"You are {name}.", model_lineage=[])
    return protos


@pytest.fixture
def embedded_parts(default_recipe, bus, embedded_models):
    """Personas on the real embedded backend, the default recipe and gate."""
    return default_recipe, bus, _personas(default_recipe, bus, embedded_models), embedded_models


@pytest.mark.slow
@pytest.mark.timeout(1500)          # 20 steps at the default rate on a busy 2-core CPU
def test_gate_refuses_ten_rows_of_random_words_at_the_default_rate(embedded_parts, tmp_path):
    """The issue's case: the adapter used to be swapped in (held-out loss 4.94 -> 4.76)
    because the held-out rows were a slice of the same file.

    20 steps, the stronger of the issue's two cases: 5 steps at the default warmup (4
    of them) barely move the adapter, so a gate that refuses 20 steps of fitting the
    noise refuses 5. The default recipe (learning rate, warmup, LoRA, batch of 2,
    max_length) except one batch per step instead of four accumulated: the same 20
    Adam steps on the same schedule, a quarter of the forward passes (train 107 -> 46 s).
    The gate faced the same decision both ways (measured once each): held-out gain
    14.6 % vs 14.1 %, lower bound 0.080 vs 0.077 against the 0.10 it needs: the
    candidate learns something that carries over, and is refused because that gain
    is not beyond its noise."""
    from a4ps.models.embedded import ct2_dir
    steps = 20
    settings, bus, protos, models = embedded_parts
    settings.finetune.grad_accum = 1
    EvalSet(settings.golden_dir).append(_rows(HELD_OUT))        # what the curator held out
    rec = EventRecorder(bus, "model.swapped")
    ft = PersonaFinetuner(settings, bus, protos, models, backend="trl")
    report = ft.finetune("BRICK", random_words(tmp_path / "words.jsonl"), steps=steps)
    assert report.ok, report.reason
    assert report.steps == steps and report.train_size == 10 and report.heldout_size == 8
    cmp = report.comparison
    assert not cmp["passed"] and not report.swapped and "refused" in report.reason
    held = cmp["heldout"]
    assert held["n"] == 8 and len(held["items"]) == 8                  # per item, both models
    assert held["ci_low"] <= settings.finetune.gate_min_gain           # not beyond its noise
    assert "not better beyond its noise" in cmp["reason"]
    assert cmp["suite"]["n"] == len(load_suite("BRICK"))
    brick = protos.get("BRICK")
    assert brick.model_name == "smollm2-135m"                          # kept its model
    entry = brick.model_lineage[-1]
    assert entry["status"] == "rejected" and entry["scores"]["passed"] is False
    assert entry["scores"]["heldout"]["ci_low"] == held["ci_low"]      # the numbers are kept
    assert rec.of("model.swapped") == []
    if settings.models.embedded.engine == "ctranslate2":               # refused: never converted
        assert not ct2_dir(settings, Path(report.adapter_dir)).exists()


@pytest.mark.slow
@pytest.mark.timeout(1500)          # training, two evaluations and ALFRED's judging on the CPU
def test_gate_accepts_a_narrow_learnable_task_then_swap_and_rollback(embedded_parts, tmp_path):
    """A fixed answer style for one kind of request, with its own held-out items, at the
    default learning rate and warmup (one row per step, to keep the test short): better
    beyond its noise there, no worse on the capability suite, not judged worse by
    ALFRED (asked under constraint), so it is swapped in."""
    settings, bus, protos, models = embedded_parts
    ft_cfg = settings.finetune
    ft_cfg.batch_size, ft_cfg.grad_accum, ft_cfg.max_length = 1, 1, 128
    ft_cfg.judge_samples = 1            # each judged pair is two generations + two decisions
    rec = EventRecorder(bus)
    ft = PersonaFinetuner(settings, bus, protos, models, backend="trl")
    train = _write(tmp_path / "train.jsonl", status_reports(PLACES[:24]))
    held = _write(tmp_path / "held.jsonl", status_reports(PLACES[24:]))

    report = ft.finetune("BRICK", train, steps=24, heldout_path=held)

    assert report.ok, report.reason
    assert report.backend == "trl" and report.steps == 24
    adapter = Path(report.adapter_dir)
    assert (adapter / "adapter_config.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    cmp = report.comparison
    assert cmp["passed"], cmp["reason"]
    assert cmp["heldout"]["ci_low"] > settings.finetune.gate_min_gain
    assert -cmp["suite"]["gain"] <= settings.finetune.suite_tolerance
    judge = cmp["judge"]
    assert judge["scored"] == 1 and 1 <= judge["samples"][0]["current_score"] <= 5
    judged = judge["samples"][0]
    assert judged["new_answer"] != judged["current_answer"]          # it answers differently
    assert report.swapped
    brick = protos.get("BRICK")
    assert brick.model_name == f"smollm2-135m+lora:{adapter}"
    assert [e["status"] for e in brick.model_lineage] == ["superseded", "live"]
    assert brick.model_lineage[1]["scores"]["heldout"] == {
        k: v for k, v in cmp["heldout"].items() if k != "items"}
    assert {"train", "eval_loss", "gate"} <= set(report.stages)
    topics = rec.topics()
    assert "finetune.progress" in topics and "model.tuned" in topics and "model.swapped" in topics
    assert (adapter.parent / "comparison.json").is_file()

    # the live persona now answers as the candidate did when ALFRED judged it
    ask = [{"role": "user", "content": judged["task"]}]
    assert brick.invoke_llm(ask, max_tokens=48) == judged["new_answer"]

    # rollback: back to the base model (and its answer), the lineage says so
    ft.rollback("BRICK")
    assert protos.get("BRICK").model_name == "smollm2-135m"
    assert [e["status"] for e in protos.get("BRICK").model_lineage] == ["live", "rolled_back"]
    assert protos.get("BRICK").invoke_llm(ask, max_tokens=48) == judged["current_answer"]


@pytest.mark.slow
def test_training_rows_that_are_evaluation_items_are_dropped(scripted_parts, tiny_recipe, tmp_path):
    """No leakage: a golden row whose task is a held-out or suite item is not trained on.
    The suite is two items of BRICK's shipped one (the child scores each twice)."""
    settings, bus, protos, models = scripted_parts
    EvalSet(settings.golden_dir).append(_rows(HELD_OUT[:4]))
    suite = small_suite(tmp_path / "suite")
    suite_q = load_suite("BRICK", suite)[0].prompt
    assert suite_q == load_suite("BRICK")[0].prompt
    data = _write(tmp_path / "g.jsonl", _rows([(HELD_OUT[0][0].upper(), "leaked"),
                                               (suite_q, "leaked too"),
                                               ("Tell me about owls.", "Owls hunt at night.")]))
    ft = PersonaFinetuner(settings, bus, protos, models, backend="trl", suite_root=suite)
    report = ft.finetune("BRICK", data, steps=1)
    assert report.ok and report.leaked == 2 and report.train_size == 1
    assert report.suite_size == 2
    trained = read_golden(Path(settings.adapter_dir) / "BRICK" / "v1" / "train.jsonl")
    assert [r["messages"][0]["content"] for r in trained] == ["Tell me about owls."]
    assert not report.swapped and "at least 4" not in report.reason   # 4 held-out rows


def test_killed_training_child_is_reported_and_system_keeps_running(scripted_parts, tiny_recipe,
                                                                   tmp_path):
    settings, bus, protos, models = scripted_parts
    ft = PersonaFinetuner(settings, bus, protos, models, backend="trl")
    killed = []

    def kill_child(event):
        if not killed and event.payload.get("pid"):
            killed.append(event.payload["pid"])
            os.kill(event.payload["pid"], signal.SIGKILL)
    bus.subscribe("finetune.progress", kill_child)
    rec = EventRecorder(bus, "finetune.progress")
    report = ft.finetune("BRICK", golden(tmp_path / "g.jsonl"), steps=50)
    assert killed
    # the child says it is loading at once (the UI shows it), so it is killed then
    assert rec.of("finetune.progress")[0].payload["stage"] == "loading"
    assert not report.ok and not report.swapped
    assert "killed by SIGKILL" in report.reason and "unchanged" in report.reason
    assert protos.get("BRICK").model_name == "smollm2-135m"
    assert protos.get("BRICK").model_lineage == []
    assert not ft.running                                            # ready for the next one
    assert models.chat("scripted", "still there?") == "SCORE: 4"     # the rest keeps working
    assert (Path(settings.adapter_dir) / "BRICK" / "v1" / "FAILED").is_file()


def test_training_child_error_is_reported(scripted_parts, tmp_path):
    """A real child that fails (a broken base checkpoint, caught before the training
    stack imports, so this runs in a second)."""
    settings, bus, protos, models = scripted_parts
    broken = tmp_path / "broken-base"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    ft = PersonaFinetuner(settings, bus, protos, models, backend="trl", base_checkpoint=broken)
    report = ft.finetune("BRICK", golden(tmp_path / "g.jsonl"), steps=2)
    assert not report.ok and report.exit_code == 1
    assert report.reason.startswith("training failed:") and "train.log" in report.reason
    assert "not valid JSON" in report.reason and str(broken) in report.reason
    assert protos.get("BRICK").model_name == "smollm2-135m"


@pytest.mark.slow
def test_ollama_swap_path(tiny_recipe, bus, tmp_path):
    """Blobs uploaded, create(from_=base, adapters=...), persona switched; a create error
    leaves the persona on its old model. The training itself is real (a few steps at a
    high rate on a fixed style, with its own held-out rows). ALFRED judges through
    Ollama's format JSON schema."""
    from ollama_standin import OllamaStandIn

    from a4ps.models.manager import ModelManager
    from a4ps.models.ollama_backend import OllamaBackend
    from a4ps.proto import ProtoManager
    from a4ps.system import INVOKE_LLM
    settings = tiny_recipe
    settings.finetune.judge_samples = 1
    settings.finetune.learning_rate = 3e-3
    settings.finetune.suite_tolerance = 0.9      # this test is about the swap path, not the suite
    suite = small_suite(tmp_path / "suite")      # (so two suite items, not BRICK's 16)

    def reply(model, msgs):
        text = msgs[-1]["content"]
        if "one digit" in text:             # the judge's score, a JSON object (format=schema)
            return '{"choice": "4"}'
        # an answer on the task's topic: the judge's checks reject an off-topic one
        return f"{model} says: here is my answer to {text[:80]!r}."

    with OllamaStandIn(models={"smollm2:135m": 100_000_000}, reply_fn=reply) as srv:
        settings.models = settings.models.model_copy(update={
            "backend": "ollama", "ollama": settings.models.ollama.model_copy(update={"host": srv.url})})
        backend = OllamaBackend(settings)
        models = ModelManager(settings, bus, backend=backend)
        protos = ProtoManager(bus)
        protos.provide("models", models)
        protos.create("persona", {"temperature": 0.0}, methods={"invoke_llm": INVOKE_LLM})
        for name in ("ALFRED", "BRICK"):
            protos.clone("persona", name, model_name="smollm2:135m", model_backend="ollama",
                         system_prompt=f"You are {name}.", model_lineage=[])
        protos.update("BRICK", {"model_name": "missing:base"})
        ft = PersonaFinetuner(settings, bus, protos, models, backend="trl", suite_root=suite)
        data = golden(tmp_path / "g.jsonl", TOPICS[:8])
        held = golden(tmp_path / "h.jsonl", TOPICS[8:])

        bad = ft.finetune("BRICK", data, steps=1, heldout_path=held)   # Ollama refuses the base
        assert bad.ok and not bad.swapped and "could not be staged" in bad.reason
        assert protos.get("BRICK").model_name == "missing:base"
        assert protos.get("BRICK").model_lineage[-1]["status"] == "failed"

        protos.update("BRICK", {"model_name": "smollm2:135m"})
        rec = EventRecorder(bus, "model.swapped")
        good = ft.finetune("BRICK", data, steps=6, heldout_path=held)
        assert good.ok, good.reason
        create = [b for m, p, b in srv.requests if p == "/api/create"][-1]
        assert create["from"] == "smollm2:135m"
        assert create["model"] == "a4ps-brick:v2"           # v1 was the failed try
        assert set(create["adapters"]) == {"adapter_model.safetensors", "adapter_config.json"}
        assert all(d in srv.blobs for d in create["adapters"].values())
        assert good.swapped, good.reason
        assert protos.get("BRICK").model_name == "a4ps-brick:v2"
        assert rec.of("model.swapped")[-1].payload["new"] == "a4ps-brick:v2"
        # the judge's answers came from both models through Ollama, scored via the schema
        judged = good.comparison["judge"]["samples"][0]
        assert judged["current_answer"].startswith("smollm2:135m")
        assert judged["new_answer"].startswith("a4ps-brick:v2")
        assert judged["current_score"] in (1, 2, 3, 4, 5)
        chat = [b for m, p, b in srv.requests if p == "/api/chat" and b.get("format")]
        assert chat and chat[-1]["format"]["properties"]["choice"]["enum"] == ["1", "2", "3", "4", "5"]
        # and the persona talks through the new tag
        assert protos.get("BRICK").invoke_llm("hi").startswith("a4ps-brick:v2")


def test_swap_is_atomic_for_running_tasks(scripted_parts):
    """A call already running keeps the model it started with; the next uses the new."""
    settings, bus, protos, models = scripted_parts
    backend = models.backend
    backend.latency_s = 0.3
    backend.models = None
    brick = protos.get("BRICK")
    t = threading.Thread(target=lambda: brick.invoke_llm("slow question"))
    t.start()
    import time
    time.sleep(0.1)
    protos.update("BRICK", {"model_name": "smollm2-135m+lora:/tmp/x"})   # what the swap does
    t.join()
    brick.invoke_llm("next question")
    assert [c[0] for c in backend.calls][-2:] == ["smollm2-135m", "smollm2-135m+lora:/tmp/x"]


def test_the_judge_changes_model_twice_not_once_per_sample(scripted_parts):
    """One model resident: the current model answers every task (ALFRED scores them),
    then the candidate does; a sample whose answer fails is no evidence, the rest count."""
    from a4ps.fine_tuning.evaluation import judge_answers
    from a4ps.fine_tuning.judge import Judge
    settings, bus, protos, models = scripted_parts
    models.backend.models = None

    def chat(model, msgs):
        if msgs[-1]["content"] == "bad" and model == "candidate":
            raise RuntimeError("candidate fell over")
        return models.chat(model, msgs)
    ev = judge_answers(Judge(models, protos), chat, [{"user": q} for q in ("a", "bad", "c")],
                       "current", "candidate", None)
    used = [c[0] for c in models.backend.calls]
    changes = [m for i, m in enumerate(used) if i == 0 or used[i - 1] != m]
    assert changes == ["current", "smollm2-135m", "candidate", "smollm2-135m"], used
    assert ev.asked == 3 and ev.scored == 2 and ev.current_mean == ev.new_mean == 4
    assert "candidate fell over" in ev.samples[1]["error"]
    assert [s["task"] for s in ev.samples] == ["a", "bad", "c"]


def test_the_gates_judge_asks_the_rubric_not_its_own_likelihood(scripted_parts, monkeypatch):
    """Grounding scores an answer by ALFRED's model's own likelihood, so in the gate it
    would favour the current model's answers (that model's own text) over every
    candidate's; even on a backend that scores options, the gate asks the rubric."""
    from a4ps.fine_tuning import unsloth_forge
    from a4ps.fine_tuning.evaluation import Comparison, JudgeEvidence
    settings, bus, protos, models = scripted_parts
    monkeypatch.setattr(type(models.backend), "scores_options", True, raising=False)
    ft = PersonaFinetuner(settings, bus, protos, models)
    monkeypatch.setattr(ft, "_loss_comparison",
                        lambda *a: Comparison("current", "candidate", passed=True))
    judges = []

    def judged(judge, *a, **kw):
        judges.append(judge)
        return JudgeEvidence()
    monkeypatch.setattr(unsloth_forge, "judge_answers", judged)
    items = [{"user": "q", "assistant": "a", "set": "heldout"}]
    ft.compare({}, "current", "candidate", items, protos.get("BRICK"))
    assert len(judges) == 1 and judges[0].method == "rubric"
    assert not judges[0]._grounded() and "unfinished" in judges[0].ignore
