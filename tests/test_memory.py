"""Long-term memory on real LanceDB files in a temp data dir."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from a4ps.config import load_settings
from a4ps.memory import MemoryStoreError, MemoryManager


class WordEmbedder:
    """Deterministic bag-of-words stand-in: texts sharing words are close."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                h = 0
                for ch in w:
                    h = (h * 131 + ord(ch)) % 1_000_003
                out[i, h % self.dim] += 1.0
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(n > 0, n, 1.0)


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def mem(settings):
    m = MemoryManager(settings, WordEmbedder())
    yield m
    m.close()


def test_add_get_search_roundtrip(mem):
    a = mem.add("brick analyses the logic of the bridge", persona="BRICK", task_id="t1",
                dissonance=0.4, meta={"round": 2})
    b = mem.add("robin feels the warmth of the morning", persona="ROBIN", kind="note")
    assert isinstance(a, str) and a != b
    rec = mem.get(a)
    assert (rec.kind, rec.persona, rec.task_id, rec.curated) == ("interaction", "BRICK", "t1", False)
    assert rec.dissonance == pytest.approx(0.4)
    assert rec.meta == {"round": 2} and rec.ts > 0
    hits = mem.search("logic of the bridge", k=2)
    assert [h.id for h in hits] == [a, b]
    assert hits[0].score > hits[1].score
    assert hits[0].distance == pytest.approx(1 - hits[0].score)
    assert [h.id for h in mem.search("logic of the bridge", kind="note")] == [b]
    assert [h.id for h in mem.search("bridge", filters="persona = 'ROBIN'")] == [b]
    assert mem.search("bridge", k=0) == [] and mem.search("  ") == []
    assert mem.count() == 2 and mem.count("note") == 1 and mem.count("reflection") == 0
    with pytest.raises(KeyError):
        mem.get("missing")


def test_bad_input_gives_clear_errors(mem):
    with pytest.raises(ValueError, match="kind must be one of"):
        mem.add("x", kind="dream")
    with pytest.raises(ValueError, match="non-empty"):
        mem.add("   ")
    with pytest.raises(ValueError, match="filter"):
        mem.search("x", filters="persona === 'x'")
    with pytest.raises(ValueError, match="kind must be one of"):
        mem.search("x", kind="dream")
    assert mem.count() == 0


def test_recent_and_curation(mem):
    ids = [mem.add(f"memory number {i}", kind="reflection" if i == 3 else "interaction")
           for i in range(6)]
    assert [r.id for r in mem.recent(3)] == ids[::-1][:3]
    assert mem.mark_curated(ids[4:]) == 2
    assert [r.id for r in mem.recent(10, uncurated_only=True)] == ids[3::-1]
    assert [r.id for r in mem.recent(10, kind="reflection")] == [ids[3]]
    assert mem.get(ids[5]).curated and not mem.get(ids[0]).curated
    assert mem.mark_curated([]) == 0
    assert mem.recent(0) == []


def test_persists_and_a_second_connection_sees_writes_at_once(settings):
    m1 = MemoryManager(settings, WordEmbedder())
    m2 = MemoryManager(settings, WordEmbedder())     # e.g. `a4ps memory search` beside the daemon
    assert m2.count() == 0
    i = m1.add("the codex values honesty")
    assert m2.count() == 1
    assert m2.search("codex honesty", k=1)[0].id == i
    m1.mark_curated([i])
    assert m2.get(i).curated
    m1.close(), m2.close()
    m3 = MemoryManager(settings, WordEmbedder())
    assert m3.get(i).text == "the codex values honesty"
    with pytest.raises(MemoryStoreError, match="64-d.*32-d"):
        MemoryManager(settings, WordEmbedder(dim=32))


def test_finds_the_right_neighbour_among_thousands(settings):
    rng = np.random.default_rng(1)
    mem = MemoryManager(settings, WordEmbedder(), auto_maintain=False)
    vecs = unit(rng, 4000, 64)
    ids = mem.add_many([{"text": f"filler {i}", "kind": "note"} for i in range(4000)],
                       vectors=vecs)
    target = mem.add("the bat cave has a secret lever behind the bust")
    for i in rng.choice(4000, 20, replace=False):
        q = vecs[i] + 0.05 * rng.standard_normal(64).astype(np.float32)
        assert mem.search(q, k=1)[0].id == ids[i]
    hit = mem.search("where is the secret lever", k=1)[0]
    assert hit.id == target and hit.text.startswith("the bat cave")
    assert mem.count() == 4001


def _clustered(rng, n, dim, centres=200, spread=0.1):
    c = unit(rng, centres, dim)[rng.integers(0, centres, n)]
    v = c + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["ivf_hnsw_sq", "ivf_pq"])
def test_index_recall_at_10_against_brute_force(data_dir, index_type):
    s = load_settings(data_dir=data_dir, memory={"index_min_rows": 3000,
                                                 "index_type": index_type})
    rng = np.random.default_rng(2)
    mem = MemoryManager(s, WordEmbedder(dim=128), auto_maintain=False)
    vecs = _clustered(rng, 4000, 128)
    rep = mem.ensure_index()
    assert not rep.indexed and "index_min_rows" in rep.note      # too small: exact search
    ids = np.asarray(mem.add_many([{"text": f"m{i}"} for i in range(4000)], vectors=vecs))
    rep = mem.ensure_index()
    assert rep.built and rep.indexed and rep.recall_at_10 >= 0.95
    assert any("vector" in i.columns for i in mem.table.list_indices())
    # Independent check: numpy exact top-10 vs what search() now returns via the index.
    qs = vecs[rng.choice(4000, 40, replace=False)] + 0.02 * rng.standard_normal((40, 128)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    truth = np.argsort(-(qs @ vecs.T), axis=1)[:, :10]
    hits = sum(len({r.id for r in mem.search(q, k=10)} & set(ids[t])) for q, t in zip(qs, truth))
    assert hits / 400 >= 0.95
    # Rows added after the index was built are still found (scanned exactly).
    new = mem.add("a brand new memory about lanterns")
    assert mem.search("lanterns", k=1)[0].id == new
    assert mem.search("lanterns", k=1, kind="interaction")[0].id == new
    assert not mem.ensure_index().built                           # once only
    mem.maintain()                                                # folds new rows in
    assert mem.search("lanterns", k=1)[0].id == new
    # A restart keeps the tuned query settings.
    again = MemoryManager(s, WordEmbedder(dim=128), auto_maintain=False)
    assert (again.nprobes, again.refine_factor, again.ef) == (mem.nprobes, mem.refine_factor, mem.ef)
    assert again.stats()["indexed"]


def test_concurrent_writes_reads_and_curation(settings):
    mem = MemoryManager(settings, WordEmbedder())
    seed_ids = [mem.add(f"seed memory {i}") for i in range(20)]
    errors: list[BaseException] = []
    written: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w):
        try:
            for i in range(25):
                rid = mem.add(f"writer {w} thought {i}", persona="BRICK", task_id=f"w{w}")
                with lock:
                    written.append(rid)
        except BaseException as e:
            errors.append(e)

    def reader():
        try:
            while not stop.is_set():
                hits = mem.search("writer thought", k=5)
                assert all(h.text for h in hits)
                mem.recent(5)
                time.sleep(0.002)   # 2 cores: let the writers run too
        except BaseException as e:
            errors.append(e)

    def curator():
        try:
            for i in range(0, 20, 2):
                mem.mark_curated(seed_ids[i:i + 2])
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    cur = threading.Thread(target=curator)
    for t in readers + writers + [cur]:
        t.start()
    for t in writers + [cur]:
        t.join(120)
    stop.set()
    for t in readers:
        t.join(30)
    mem.close()
    assert not errors, errors
    assert len(written) == 100 and mem.count() == 120
    assert len(mem.recent(1000, uncurated_only=True)) == 100
    assert mem.get(written[-1]).task_id.startswith("w")


def test_auto_maintenance_compacts_in_background(data_dir, monkeypatch):
    import a4ps.memory as memory_mod

    monkeypatch.setattr(memory_mod, "_MAINTAIN_EVERY", 16)
    s = load_settings(data_dir=data_dir)
    mem = MemoryManager(s, WordEmbedder())
    ids = [mem.add(f"note {i}") for i in range(32)]
    mem.close()                                   # waits for the background run
    assert mem.count() == 32
    assert mem.table.stats()["fragment_stats"]["num_fragments"] < 32   # compacted
    assert mem.get(ids[0]).text == "note 0"


@pytest.mark.slow
def test_real_minilm_semantic_recall(settings, minilm):
    mem = MemoryManager(settings, minilm)          # the product's embedder, loaded once
    facts = {
        "cooking": "Simmer the tomato sauce for twenty minutes before adding basil.",
        "space": "The rocket reached low Earth orbit after a nine minute burn.",
        "finance": "Interest rates rose, so the mortgage payment went up.",
        "music": "She practised the violin concerto every evening.",
    }
    ids = {k: mem.add(v, kind="note") for k, v in facts.items()}
    assert mem.search("How long should pasta sauce cook?", k=1)[0].id == ids["cooking"]
    assert mem.search("spacecraft launch", k=1)[0].id == ids["space"]
    assert mem.search("bank loans getting more expensive", k=1)[0].id == ids["finance"]
    top = mem.search("playing a string instrument", k=4)
    assert top[0].id == ids["music"] and top[0].score > top[-1].score


def test_hybrid_search_finds_exact_codes_the_embedding_blurs(settings):
    class Blurry:
        """A 2-d embedder: every text lands in one of 2 directions."""

        dim = 2

        def embed(self, texts):
            v = np.array([[1.0, 0.1] if len(t) % 2 else [0.1, 1.0] for t in texts],
                         dtype=np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    mem = MemoryManager(settings, Blurry(), auto_maintain=False)
    mem.add_many([{"text": f"routine log line {i} nothing to see"} for i in range(200)])
    target = mem.add("the vault codeword is ORCHID77 for tonight", persona="ALFRED")
    assert target not in [r.id for r in mem.search("codeword ORCHID77", k=3)]
    hits = mem.search("codeword ORCHID77", k=3, hybrid=True)
    # Reciprocal rank fusion: FTS rank 1 ties the vector rank 1, so top-2, not top-1.
    assert target in [h.id for h in hits[:2]]
    assert all(h.score is not None and h.score > 0 for h in hits)
    assert target not in [r.id for r in mem.search("ORCHID77", k=3, hybrid=True,
                                                   filters="persona = 'BRICK'")]
    later = mem.add("a second secret: PELICAN42")       # added after the FTS index
    assert later in [h.id for h in mem.search("PELICAN42", k=2, hybrid=True)]
    assert not mem.stats()["indexed"]                    # FTS is not the vector index
