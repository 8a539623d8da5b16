"""The embedded engine's thread choice: timed once per machine (1 thread against the
policy's N), remembered beside the model, overridden by the setting. The choosing logic
runs on a fake timer; the real-model tests (slow) time the real engine and check that
the thread count never changes the text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from a4ps.models import thread_choice as tc


def fake_timer(per_token: dict[int, float], calls: list[int] | None = None):
    """Seconds per token by thread count, each call recorded (stands in for decoding)."""
    def timer(threads: int, tokens: int) -> float:
        if calls is not None:
            calls.append(threads)
        return per_token[threads]
    return timer


KEY = {"cpu": "test cpu", "cpus": 2, "cores": 2, "cgroup": None, "policy": 2,
       "spin": False, "engine": "ctranslate2 x int8", "model": "abc"}


def test_the_faster_thread_count_is_kept(tmp_path):
    calls: list[int] = []
    c = tc.choose_threads(0, 2, tmp_path / "t.json", KEY,
                          fake_timer({1: 0.025, 2: 0.036}, calls))
    assert (c.threads, c.source) == (1, "probe")
    assert c.rates[1] == pytest.approx(40.0) and c.rates[2] == pytest.approx(1 / 0.036)
    assert calls == [1, 2, 2, 1, 1, 2, 2, 1]   # alternating and mirrored
    c2 = tc.choose_threads(0, 2, tmp_path / "u.json", KEY, fake_timer({1: 0.03, 2: 0.02}))
    assert (c2.threads, c2.source) == (2, "probe")


def test_a_burst_of_other_work_in_one_round_does_not_decide():
    """One round of the faster count lands on a burst of other work (5x slower): the
    median of the rounds still sees it as the faster."""
    slow = iter([False, False, False, True] + [False] * 10)

    def bursty(threads: int, tokens: int) -> float:
        base = 0.025 if threads == 1 else 0.035
        return base * 5 if threads == 1 and next(slow) else base
    rates = tc.measure((1, 2), bursty)
    assert tc.fastest(rates, policy=2) == 1 and rates[1] == pytest.approx(40.0)


def test_a_load_that_drifts_during_the_probe_weighs_on_both_alike():
    """The machine slows steadily while it is probed; both counts cost the same per
    token, so neither may look faster (the mirrored order cancels a linear drift)."""
    step = iter(range(100))

    def drifting(threads: int, tokens: int) -> float:
        return 0.020 + 0.005 * next(step)
    rates = tc.measure((1, 2), drifting)
    assert rates[1] == pytest.approx(rates[2])
    assert tc.fastest(rates, policy=2) == 2          # a tie keeps the policy


def test_the_choice_is_remembered_and_read_not_measured_again(tmp_path):
    cache = tmp_path / "model.threads.json"
    first = tc.choose_threads(0, 2, cache, KEY, fake_timer({1: 0.02, 2: 0.03}))
    assert first.source == "probe" and cache.is_file()

    def must_not_run(threads: int, tokens: int) -> float:
        raise AssertionError("a remembered choice was measured again")
    again = tc.choose_threads(0, 2, cache, KEY, must_not_run)
    assert (again.threads, again.source, again.rates) == (1, "cache", first.rates)
    assert again.info() == {"threads": 1, "policy": 2, "source": "cache",
                            "tokens_per_s": {"1": 50.0, "2": 33.3},
                            "load_average": first.load}


@pytest.mark.parametrize("change", [{"cpu": "another cpu"}, {"cpus": 4}, {"cores": 1},
                                    {"cgroup": 1.5}, {"policy": 4}, {"spin": True},
                                    {"engine": "ctranslate2 y int8"}, {"model": "def"}])
def test_a_changed_machine_or_model_is_measured_again(tmp_path, change):
    cache = tmp_path / "model.threads.json"
    tc.choose_threads(0, 2, cache, KEY, fake_timer({1: 0.02, 2: 0.03}))
    key = {**KEY, **change}
    policy = key["policy"]
    calls: list[int] = []
    c = tc.choose_threads(0, policy, cache, key, fake_timer({1: 0.03, policy: 0.02}, calls))
    assert (c.threads, c.source) == (policy, "probe") and calls
    assert json.loads(cache.read_text())["key"] == key          # the new answer is kept


def test_the_setting_overrides_and_one_core_needs_no_probe(tmp_path):
    cache = tmp_path / "model.threads.json"
    calls: list[int] = []
    timer = fake_timer({1: 0.02, 2: 0.03, 3: 0.01}, calls)
    assert tc.choose_threads(3, 2, cache, KEY, timer) == tc.ThreadChoice(3, 2, "setting")
    tc.choose_threads(0, 2, cache, KEY, timer)                  # remembered: 1
    calls.clear()
    assert tc.choose_threads(2, 2, cache, KEY, timer).threads == 2  # the setting wins
    assert tc.choose_threads(0, 1, cache, {**KEY, "policy": 1}, timer) == \
        tc.ThreadChoice(1, 1, "policy")
    assert calls == []


def test_a_damaged_or_unwritable_cache_costs_only_a_probe(tmp_path, caplog):
    cache = tmp_path / "model.threads.json"
    cache.write_text("{not json")
    c = tc.choose_threads(0, 2, cache, KEY, fake_timer({1: 0.02, 2: 0.03}))
    assert c.source == "probe" and json.loads(cache.read_text())["threads"] == 1
    missing = tmp_path / "gone" / "model.threads.json"            # its folder is absent
    c = tc.choose_threads(0, 2, missing, KEY, fake_timer({1: 0.03, 2: 0.02}))
    assert (c.threads, c.source) == (2, "probe") and not missing.exists()
    assert "times it again" in caplog.text
    assert list(tmp_path.glob(".*tmp*")) == []


def test_a_probe_that_fails_runs_on_the_policy_and_is_not_remembered(tmp_path, caplog):
    """A failed probe (here: the model ends its reply at once) must not fail the load."""
    cache = tmp_path / "model.threads.json"

    def fails(threads: int, tokens: int) -> float:
        raise RuntimeError("the prompt ended at once")
    c = tc.choose_threads(0, 2, cache, KEY, fails)
    assert c == tc.ThreadChoice(2, 2, "policy") and not cache.exists()
    assert "timing the thread counts failed" in caplog.text


def test_the_key_holds_what_changes_the_answer(monkeypatch):
    monkeypatch.setattr(tc, "available_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(tc, "physical_cores", lambda cpus: 2)
    monkeypatch.setattr(tc, "cgroup_cpu_limit", lambda: 1.5)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    k = tc.machine_key(1, "ctranslate2 4.8.5 int8", "abc")
    assert (k["cpus"], k["cores"], k["cgroup"], k["policy"], k["model"]) == (4, 2, 1.5, 1, "abc")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert k["spin"] is False and tc.machine_key(1, "e", "abc")["spin"] is True
    assert k["cpu"]                                  # the CPU's model name
    assert json.loads(json.dumps(k)) == k            # stored and compared as JSON


# --- the real engine --------------------------------------------------------------------

# three long answers (a difference in rounding shows sooner in 64 free tokens than in a
# short fact; six prompts gave the same verdict at twice the suite time)
PROMPTS = ["What is the capital of France?",
           "Explain in two sentences why the sky is blue.",
           "Summarise the plot of Romeo and Juliet in one paragraph.",
           "What is 17 times 23? Think step by step."]


def _converted(cache, compute_type: str = "int8"):
    from a4ps.config import load_settings
    from a4ps.models.embedded import ensure_ct2_model
    s = load_settings(data_dir=cache.parent / "unused-data")
    s.models.embedded.cache_dir = cache
    s.models.embedded.compute_type = compute_type      # type: ignore[assignment]
    return ensure_ct2_model(s)


@pytest.fixture(scope="module")
def ct2_model(model_cache_dir):
    return _converted(model_cache_dir)


@pytest.mark.slow
@pytest.mark.parametrize("compute_type", ["int8", "float32"])
def test_the_text_does_not_change_with_the_thread_count(model_cache_dir, compute_type):
    """Greedy replies and decision log-probabilities on one thread and on two are the
    same, on the default int8 model and on the float32 one the engine-agreement test
    uses (the probe may pick either count; CI checks exact texts)."""
    from a4ps.models.ct2_engine import CT2Engine
    from a4ps.models.engine import Sampling, run_generation
    from a4ps.models.tokens import ChatTokenizer
    path = _converted(model_cache_dir, compute_type)
    tok = ChatTokenizer(path)
    one, two = (CT2Engine(path, tok, threads=n, compute_type=compute_type) for n in (1, 2))
    for prompt in PROMPTS[1:]:
        msgs = [{"role": "user", "content": prompt}]
        a, b = (run_generation(e, tok, msgs, max_new=64, sampling=Sampling()).text
                for e in (one, two))
        assert a == b, prompt
    prefix = tok.chat_ids([{"role": "user", "content": PROMPTS[0]}])
    options = [tok.encode(" Paris"), tok.encode(" Lyon"), tok.encode(" Rome")]
    assert one.score(prefix, options) == two.score(prefix, options)


@pytest.mark.slow
def test_first_load_times_the_threads_and_later_loads_read_the_choice(
        ct2_model, tmp_path, monkeypatch):
    """A fresh cache (the converted model linked in): the first load probes 1 against 2
    threads, says so in its progress and loaded event, and remembers; the next load
    reads the choice (no probe: bench_models.py times the load from cache)."""
    from a4ps.config import load_settings
    from a4ps.events import EventBus, EventRecorder
    from a4ps.models import embedded
    from a4ps.models.manager import ModelManager
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ct2_model.name).symlink_to(ct2_model, target_is_directory=True)
    monkeypatch.setattr(embedded, "default_threads", lambda: 2)   # a 2-core policy anywhere
    s = load_settings(data_dir=tmp_path / "data")
    s.models.embedded.cache_dir = cache
    bus = EventBus()
    rec = EventRecorder(bus)
    mm = ModelManager(s, bus, backend=embedded.EmbeddedBackend(s))
    try:
        mm.load(embedded.BASE_ID)
        stages = [e.payload.get("stage") or "" for e in rec.of("model.loading")]
        assert any("timing 1 and 2 threads" in st for st in stages)
        loaded = rec.of("model.loaded")[-1].payload
        choice = loaded["thread_choice"]
        assert choice["source"] == "probe" and set(choice["tokens_per_s"]) == {"1", "2"}
        assert loaded["threads"] == choice["threads"] == mm.stats()["threads"]
        remembered = json.loads(embedded.ct2_threads_file(s).read_text())
        assert remembered["threads"] == choice["threads"]
        assert embedded.ct2_threads_file(s).parent == cache
        mm.release()
        seen = len(rec.of("model.loading"))
        mm.load(embedded.BASE_ID)
        assert not any("timing" in (e.payload.get("stage") or "")
                       for e in rec.of("model.loading")[seen:])
        again = rec.of("model.loaded")[-1].payload["thread_choice"]
        assert again == {**choice, "source": "cache"}
        assert mm.backend.threads == choice["threads"]
        assert mm.chat(embedded.BASE_ID, [{"role": "user", "content": PROMPTS[0]}],
                       max_tokens=16)
    finally:
        mm.release()
