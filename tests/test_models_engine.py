"""The embedded engines' shared loop: streaming, stop strings, the repetition guard,
cancel, finish reasons, generation knobs, thread policy, backend conformance."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from a4ps.models import threads
from a4ps.models.base import ChatBackend
from a4ps.models.engine import Sampling, run_generation, sampling_from
from a4ps.models.errors import InvalidRequest
from a4ps.models.tokens import RepetitionGuard
from model_standins import StandInEngine, char_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("tok"))


def _gen(tok, text, **kw):
    eng = StandInEngine(tok, writes=lambda prompt: text)
    pieces: list[str] = []
    g = run_generation(eng, tok, [{"role": "user", "content": "hi"}], max_new=kw.pop("max_new", 200),
                       sampling=Sampling(), on_token=pieces.append, **kw)
    return g, pieces, eng


def test_streams_pieces_as_they_come_and_ends_at_the_end_of_turn(tok):
    g, pieces, eng = _gen(tok, "Paris is the capital.<|im_end|>ignored")
    assert g.text == "Paris is the capital." and g.finish == "eos"
    assert len(pieces) > 5 and "".join(pieces) == g.text
    assert g.tokens == len("Paris is the capital.") and g.ttft_s is not None
    assert eng.closed == 1


def test_stop_string_cuts_inside_the_loop_and_is_never_streamed(tok):
    g, pieces, _ = _gen(tok, "one, two, three\nUSER: more text", stop=["USER:"])
    assert g.finish == "stop" and g.text == "one, two, three"
    assert "USER" not in "".join(pieces) and "US" not in "".join(pieces)
    assert g.tokens < len("one, two, three\nUSER: more text")     # stopped early


def test_length_finish(tok):
    g, _, _ = _gen(tok, "abcdefghijklmnopqrstuvwxyz", max_new=5)
    assert g.finish == "length" and g.text == "abcde" and g.tokens == 5


def test_repetition_guard_stops_a_loop_while_generating(tok):
    sentence = "The keeper looked at the sea. "
    g, _, _ = _gen(tok, "Once upon a time. " + sentence * 8)
    assert g.finish == "repetition"
    assert g.text.count("keeper looked at the sea") == 1
    assert g.tokens < len(sentence) * 3        # it did not spend the budget repeating


def test_repetition_guard_leaves_ordinary_text_alone():
    guard = RepetitionGuard()
    text = ("It was a dark and stormy night; the rain fell in torrents, except at "
            "occasional intervals, when it was checked by a violent gust of wind. " * 1)
    assert all(guard.push(ord(c)) is None for c in text)
    guard = RepetitionGuard()
    assert [guard.push(7) for _ in range(23)] == [None] * 23   # 23 same tokens: not yet
    assert guard.push(7) == 1                                  # 24: a loop, keep one


def test_cancel_stops_within_a_token(tok):
    ev = threading.Event()
    got: list[str] = []

    def on_token(piece):
        got.append(piece)
        if len(got) == 3:
            ev.set()
    eng = StandInEngine(tok, writes=lambda p: "abcdefghijklmnop")
    g = run_generation(eng, tok, [{"role": "user", "content": "x"}], max_new=50,
                       sampling=Sampling(), on_token=on_token, cancel=ev)
    assert g.finish == "cancelled" and g.tokens <= 4 and eng.closed == 1


def test_generation_knobs_come_from_the_call_over_the_settings():
    cfg = SimpleNamespace(do_sample=False, top_p=0.9, repetition_penalty=1.0,
                          no_repeat_ngram_size=0)
    s = sampling_from(cfg, None, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 4,
                                  "top_p": 0.5})
    assert s.greedy and s.repetition_penalty == 1.3 and s.no_repeat_ngram_size == 4
    assert s.top_p == 0.5
    assert not sampling_from(SimpleNamespace(**{**vars(cfg), "do_sample": True}), 0.8, {}).greedy
    assert sampling_from(SimpleNamespace(**{**vars(cfg), "do_sample": True}), 0.0, {}).greedy
    with pytest.raises(InvalidRequest, match="unknown generation options"):
        sampling_from(cfg, None, {"beam_size": 4})
    with pytest.raises(InvalidRequest, match="top_p"):
        sampling_from(cfg, None, {"top_p": 0})


# -- threads ---------------------------------------------------------------------

def _cpu(sysfs, n, core, pkg=0):
    d = sysfs / f"cpu{n}" / "topology"
    d.mkdir(parents=True)
    (d / "core_id").write_text(f"{core}\n")
    (d / "physical_package_id").write_text(f"{pkg}\n")


def test_physical_cores_count_smt_siblings_once(tmp_path):
    for n, core in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        _cpu(tmp_path, n, core)
    assert threads.physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert threads.physical_cores({0, 2}, tmp_path) == 2
    assert threads.physical_cores({0, 1}, tmp_path) == 1


def test_cgroup_quota_caps_threads(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None
    monkeypatch.setattr(threads, "available_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "physical_cores", lambda cpus: 4)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.default_threads() == 1
    assert threads.resolve_threads(3) == 3        # the setting overrides
    assert threads.resolve_threads(0) == 1


def test_threads_follow_the_affinity_mask(monkeypatch):
    import os
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    assert threads.available_cpus() == set(os.sched_getaffinity(0))
    assert 1 <= threads.default_threads() <= len(os.sched_getaffinity(0))


def test_openmp_waits_passively_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.apply_openmp_policy()
    import os
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.apply_openmp_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


# -- every backend is a ChatBackend ------------------------------------------------

def test_onnx_runtime_pools_do_not_spin_unless_the_user_chose(monkeypatch):
    """ORT's own pool ignores OMP_WAIT_POLICY and spins by default (it collapsed beside
    two busy processes); its session options follow the same policy."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    opts = threads.ort_session_options(2)
    assert opts["session.intra_op.allow_spinning"] == "0"
    assert opts["session.inter_op.allow_spinning"] == "0"
    assert (opts["intra_op_num_threads"], opts["inter_op_num_threads"]) == (2, 1)
    assert threads.ort_session_options(0)["intra_op_num_threads"] == 1
    # genai_config takes config entries only as strings (a number is a load error)
    assert all(isinstance(v, str) for k, v in opts.items() if k.startswith("session."))
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert threads.ort_session_options(2)["session.intra_op.allow_spinning"] == "1"


def test_every_backend_class_conforms_to_the_protocol():
    from a4ps.models.embedded import EmbeddedBackend
    from a4ps.models.ollama_backend import OllamaBackend
    from a4ps.models.openai_backend import OpenAIBackend
    from a4ps.models.scripted import ScriptedBackend
    members = ["name", "resident", "estimate_bytes", "load", "unload", "generate",
               "choose", "structured"]
    for cls in (EmbeddedBackend, OllamaBackend, OpenAIBackend, ScriptedBackend):
        missing = [m for m in members if not hasattr(cls, m) and m != "name"]
        assert not missing, (cls, missing)
    settings = SimpleNamespace(models=SimpleNamespace(embedded=SimpleNamespace(engine="ctranslate2")))
    assert isinstance(EmbeddedBackend(settings), ChatBackend)
    from a4ps.models.scripted import demo_backend
    assert isinstance(demo_backend(), ChatBackend)


# -- the repetition penalty and n-gram ban every engine applies alike -------------------

def test_penalty_counts_generated_tokens_only_as_ctranslate2_does():
    """A persona's repetition_penalty / no_repeat_ngram_size mean the same on every
    engine: CTranslate2 (the default) penalises the tokens it has generated, not the
    prompt; ORT GenAI's and transformers' own processors count the prompt too."""
    import numpy as np
    from a4ps.models.engine import GeneratedPenalty
    p = GeneratedPenalty(Sampling(repetition_penalty=2.0, no_repeat_ngram_size=0))
    row = np.array([4.0, -1.0, 3.0, 0.5], dtype=np.float32)
    assert not p.active                   # nothing generated yet: the prompt is not counted
    p.apply(row)
    assert row.tolist() == [4.0, -1.0, 3.0, 0.5]
    for t in (0, 1, 0):
        p.push(t)
    p.apply(row)
    # seen tokens once each: a positive logit divided, a negative one multiplied
    assert row.tolist() == [2.0, -2.0, 3.0, 0.5]


def test_ngram_ban_blocks_what_would_complete_a_generated_ngram():
    import numpy as np
    from a4ps.models.engine import GeneratedPenalty
    p = GeneratedPenalty(Sampling(no_repeat_ngram_size=3))
    for t in (5, 6, 7, 5):
        p.push(t)
    row = np.zeros(10, dtype=np.float32)
    p.apply(row)
    assert np.isfinite(row).all()         # "6 7 5" and "7 5 ?": no 3-gram starts "7 5"
    p.push(6)                             # last two "5 6": "5 6 7" was generated
    p.apply(row)
    assert row[7] == -np.inf and np.isfinite(np.delete(row, 7)).all()
    one = GeneratedPenalty(Sampling(no_repeat_ngram_size=1))
    for t in (2, 4):
        one.push(t)
    row = np.zeros(6, dtype=np.float32)
    one.apply(row)
    assert [i for i in range(6) if row[i] == -np.inf] == [2, 4]
