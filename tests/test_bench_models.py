"""The checks bench/bench_models.py makes on its own figures: a decode rate counts only
when the run produced the requested tokens, decision accuracies are compared on the
same cases with their uncertainty, and the a4ps loop's own cost is measured with the
engine taken out (so "engine" and "our overhead" are separate numbers)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_models_under_test",
                                                  ROOT / "bench" / "bench_models.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_token_check_names_every_short_or_failed_run(bench):
    runs = {"ct2": [{"tokens": 128, "finish": "length"}, {"tokens": 40, "finish": "eos"}],
            "ort": [{"tokens": 128, "finish": "length"}, {}],
            "llama": [{"tokens": 128, "finish": "length"}]}
    short = bench.token_shortfalls(runs, 128)
    assert short == ["ct2 run 2: 40 of 128 tokens (finish eos)",
                     "ort run 2: failed (see stderr)"]
    assert bench.token_shortfalls({"ct2": [{"tokens": 128}]}, 128) == []


def test_wilson_interval_of_a_small_labelled_set(bench):
    lo, hi = bench.wilson(24, 40)                    # 60% of 40 cases
    assert lo == pytest.approx(0.446, abs=0.002)
    assert hi == pytest.approx(0.736, abs=0.002)
    assert bench.wilson(0, 10)[0] == 0.0 and bench.wilson(10, 10)[1] == 1.0


def test_mcnemar_counts_discordant_cases_and_gives_the_exact_p(bench):
    a = [True] * 20 + [True, True, True, False] + [False] * 16
    b = [True] * 20 + [False, False, False, True] + [False] * 16
    only_a, only_b, p = bench.mcnemar_exact(a, b)
    assert (only_a, only_b) == (3, 1)
    assert p == pytest.approx(0.625)                 # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    assert bench.mcnemar_exact(a, a) == (0, 0, 1.0)
    assert bench.mcnemar_exact([True] * 8, [False] * 8)[2] == pytest.approx(2 / 256)


def test_loop_overhead_replays_real_ids_through_the_real_loop(bench, model_cache_dir, tmp_path):
    """The overhead figure runs the product's run_generation on the real tokenizer (stop
    strings, repetition guard, detokenising): a measured cost per token, far below the
    tens of milliseconds one token costs any engine here."""
    from a4ps.config import load_settings
    from a4ps.models.embedded import ensure_ct2_model
    from a4ps.models.tokens import ChatTokenizer
    s = load_settings(data_dir=tmp_path)
    s.models.embedded.cache_dir = model_cache_dir
    tok = ChatTokenizer(ensure_ct2_model(s))
    ids = tok.encode("The keeper climbed the stairs and read the message twice. " * 3)
    ov = bench.loop_overhead_us(tok, ids, repeats=3)
    assert ov["loop"] > 0 and ov["bare"] > 0 and ov["prompt_ms"] > 0
    assert ov["loop"] < 5000                         # far below one token of any engine


def test_peer_as_ollama_runs_it_gets_no_wait_policy(bench, monkeypatch):
    """Every row runs with OMP_WAIT_POLICY=PASSIVE except the peer's default-waits row,
    whose child must not see the variable at all (libgomp's default then applies)."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    show = [sys.executable, "-c",
            "import json, os; print(json.dumps({'v': os.environ.get('OMP_WAIT_POLICY')}))"]
    assert bench.run_json(show, 1) == {"v": "PASSIVE"}
    assert bench.run_json(show, 1, env={"OMP_WAIT_POLICY": bench.UNSET}) == {"v": None}
