"""Long-term memory on object storage (``memory.uri = "s3://bucket/path"``) against a
real local S3 server (moto, tests/s3_server.py): the same MemoryManager API, nothing on
local disk, another data directory sees the same memories, a reader and a writer in
separate processes at once, two writers at once, and clear errors for a bad bucket."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from a4ps.config import SettingsError, load_settings
from a4ps.memory import MemoryManager, MemoryStoreError
from a4ps.models.embeddings import HashEmbedder
from s3_server import LocalS3

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def local_s3():
    with LocalS3() as s3:
        yield s3


@pytest.fixture
def bucket(local_s3) -> str:
    return local_s3.create_bucket(f"mem-{uuid.uuid4().hex[:10]}")


def s3_settings(data_dir: Path, local_s3: LocalS3, bucket: str, **memory):
    return load_settings(data_dir=data_dir, memory={
        "uri": f"s3://{bucket}/a4ps", "storage_options": local_s3.storage_options, **memory})


def test_memory_lives_in_the_bucket_and_another_data_dir_sees_it(tmp_path, local_s3, bucket):
    s = s3_settings(tmp_path / "a", local_s3, bucket)
    mem = MemoryManager(s, HashEmbedder(dim=384), auto_maintain=False)
    ids = [mem.add(t, kind="interaction", persona="BRICK", task_id=f"t{i}")
           for i, t in enumerate(["the sky is blue because of Rayleigh scattering",
                                  "seven apples shared by three friends",
                                  "kindness matters more than fairness"])]
    assert mem.count() == 3 and mem.remote and mem.uri == f"s3://{bucket}/a4ps"
    hit = mem.search("why is the sky blue", k=1)[0]
    assert hit.id == ids[0] and hit.persona == "BRICK"
    assert mem.mark_curated([ids[1]]) == 1
    assert [r.id for r in mem.recent(2)] == [ids[2], ids[1]]
    assert not (tmp_path / "a" / "memory_db").exists()         # nothing on local disk
    keys = local_s3.keys(bucket, "a4ps/memories.lance/")
    assert any("/_versions/" in k for k in keys) and any("/data/" in k for k in keys)
    mem.close()

    other = MemoryManager(s3_settings(tmp_path / "b", local_s3, bucket), HashEmbedder(dim=384),
                          auto_maintain=False)
    assert other.count() == 3 and other.get(ids[1]).curated
    assert other.search("apples for friends", k=1)[0].id == ids[1]
    other.close()


def _worker(data_dir: Path, who: str, n: int, local_s3: LocalS3, bucket: str, **extra_env):
    env = {**os.environ, **extra_env, "PYTHONPATH": str(ROOT),
           "A4PS_MEMORY__URI": f"s3://{bucket}/a4ps",
           "A4PS_MEMORY__STORAGE_OPTIONS": json.dumps(local_s3.storage_options)}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "memory_worker.py"),
                             str(data_dir), who, str(n)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow   # a second interpreter and ~40 commits through the S3 server
def test_a_reader_and_a_writer_in_two_processes_at_once(tmp_path, local_s3, bucket):
    s = s3_settings(tmp_path / "reader", local_s3, bucket)
    reader = MemoryManager(s, HashEmbedder(dim=384), auto_maintain=False)  # creates the table
    n = 30
    proc = _worker(tmp_path / "writer", "w", n, local_s3, bucket)
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            count = reader.count()
            seen.append(count)
            for rec in reader.search("apples number", k=50):
                # every row a reader sees is whole: text, vector search, metadata
                assert rec.text.startswith(f"w-{rec.meta['i']} ") and rec.persona == "w"
            time.sleep(0.05)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "done" in out, out[-2000:]
    assert seen == sorted(seen), "a reader saw the table go back in time"
    assert len(set(seen)) >= 3, f"the reader did not overlap the writer: {seen}"
    assert reader.count() == n                     # the writer's rows, seen at once
    assert sorted(r.meta["i"] for r in reader.recent(n)) == list(range(n))
    reader.close()


@pytest.mark.slow   # two more interpreters writing at once
def test_two_writers_at_once_lose_nothing(tmp_path, local_s3, bucket):
    MemoryManager(s3_settings(tmp_path / "x", local_s3, bucket), HashEmbedder(dim=384),
                  auto_maintain=False).close()          # the table exists before they race
    procs = [_worker(tmp_path / w, w, 15, local_s3, bucket) for w in ("a", "b")]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    mem = MemoryManager(s3_settings(tmp_path / "x", local_s3, bucket), HashEmbedder(dim=384),
                        auto_maintain=False)
    got = sorted(r.text.split()[0] for r in mem.recent(100))
    assert got == sorted(f"{w}-{i}" for w in "ab" for i in range(15))
    mem.close()


@pytest.mark.slow   # four interpreters, ~60 commits racing through one S3 server
def test_four_writers_whose_lance_gives_up_fast_still_lose_nothing(tmp_path, local_s3, bucket):
    """Real contention past LanceDB's own retries: each writer's Lance gives up after
    1 s of lost commits (LANCE_COMMIT_RETRY_TIMEOUT_SECS; 30 s by default, which four
    writers on a loaded 2-core machine exhausted), so MemoryManager's retry must carry
    the write; every row lands exactly once."""
    MemoryManager(s3_settings(tmp_path / "x", local_s3, bucket), HashEmbedder(dim=384),
                  auto_maintain=False).close()
    writers = "abcd"
    procs = [_worker(tmp_path / w, w, 15, local_s3, bucket,
                     LANCE_COMMIT_RETRY_TIMEOUT_SECS="1") for w in writers]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(writers), outs
    mem = MemoryManager(s3_settings(tmp_path / "x", local_s3, bucket), HashEmbedder(dim=384),
                        auto_maintain=False)
    got = sorted(r.text.split()[0] for r in mem.recent(1000))
    assert got == sorted(f"{w}-{i}" for w in writers for i in range(15))
    mem.close()
    print("commit retries per writer:", [o.split("commit_retries=")[-1].strip() for o in outs])


@pytest.fixture
def slow_puts(monkeypatch):
    """Widen the gap between moto's 'does the key exist?' and its write of keys that
    match a pattern (what a loaded server does), so concurrent writes of them overlap."""
    from moto.s3.models import S3Backend

    real = S3Backend.put_object
    slow: dict[str, float] = {}

    def put_object(self, bucket_name, key_name, *a, **kw):
        for pattern, seconds in slow.items():
            if pattern in key_name:
                time.sleep(seconds)
        return real(self, bucket_name, key_name, *a, **kw)

    monkeypatch.setattr(S3Backend, "put_object", put_object)
    return slow


def _at_once(*calls):
    """Run the calls on threads released together; returns their results in order."""
    go = threading.Barrier(len(calls))
    out: list = [None] * len(calls)

    def run(i, call):
        go.wait()
        try:
            out[i] = call()
        except Exception as e:      # returned, so the test can assert on it
            out[i] = e
    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.slow   # ~8 s on a loaded machine; guards a race that is handled today
def test_two_daemons_creating_the_memory_at_once_both_open_it(tmp_path, local_s3, bucket,
                                                              slow_puts):
    """An empty bucket and two daemons starting together: both commit version 1, the
    store refuses one (412), and that one opens the table the other created."""
    slow_puts["/_versions/"] = 0.3
    seen = len(local_s3.conditional_writes)
    mems = _at_once(*[lambda w=w: MemoryManager(s3_settings(tmp_path / w, local_s3, bucket),
                                                HashEmbedder(dim=384), auto_maintain=False)
                      for w in "ab"])
    slow_puts.clear()
    assert all(isinstance(m, MemoryManager) for m in mems), mems
    assert any(p.endswith(".manifest") and status == 412
               for p, status in local_s3.conditional_writes[seen:]), "they never raced"
    ids = [m.add(f"{w} was here") for m, w in zip(mems, "ab")]
    assert {r.id for r in mems[1].recent(5)} == set(ids)
    for m in mems:
        m.close()


def test_the_stand_in_lets_one_of_two_concurrent_put_if_absent_win(local_s3, bucket, slow_puts):
    """S3 semantics Lance relies on: of two concurrent If-None-Match PUTs of one new key,
    exactly one succeeds and the other gets 412 (moto alone let both succeed)."""
    from botocore.exceptions import ClientError

    slow_puts["race/key"] = 0.3
    clients = [local_s3.client(), local_s3.client()]

    def put(i):
        try:
            clients[i].put_object(Bucket=bucket, Key="race/key", Body=f"writer {i}".encode(),
                                  IfNoneMatch="*")
            return 200
        except ClientError as e:
            return int(e.response["ResponseMetadata"]["HTTPStatusCode"])
    assert sorted(_at_once(lambda: put(0), lambda: put(1))) == [200, 412]
    body = local_s3.client().get_object(Bucket=bucket, Key="race/key")["Body"].read()
    assert body in (b"writer 0", b"writer 1")


def test_two_writers_racing_for_one_version_both_land(tmp_path, local_s3, bucket, slow_puts):
    """Two writers that read the same table version and commit at once: the store refuses
    one manifest (412), Lance re-reads and commits it as the next version; no row lost.
    Both must read the version within the slowed put (~0.3 s); on a loaded machine one
    round may miss that, so up to three rounds are run until one of them raced."""
    mems = [MemoryManager(s3_settings(tmp_path / w, local_s3, bucket), HashEmbedder(dim=384),
                          auto_maintain=False) for w in ("a", "b")]
    slow_puts["/_versions/"] = 0.3          # both commits are in flight at once
    seen = len(local_s3.conditional_writes)
    rounds, refused = 0, []
    while rounds < 3 and not refused:
        rounds += 1
        ids = _at_once(*[lambda m=m, w=w, r=rounds: m.add(f"{w}{r} remembers pears",
                                                          persona=w)
                         for m, w in zip(mems, "ab")])
        assert all(isinstance(i, str) for i in ids), ids
        refused = [p for p, status in local_s3.conditional_writes[seen:] if status == 412]
    slow_puts.clear()
    assert refused, f"the two commits never raced in {rounds} rounds; the test proves nothing"
    assert sorted(r.text.split()[0] for r in mems[0].recent(10)) == \
        sorted(f"{w}{r}" for w in "ab" for r in range(1, rounds + 1))
    for m in mems:
        m.close()


@pytest.mark.slow   # ~60 commits through the S3 server
def test_appends_curation_and_compaction_racing_on_s3_lose_nothing(tmp_path, local_s3, bucket):
    from test_memory_conflicts import race_appends_curation_and_compaction
    race_appends_curation_and_compaction(s3_settings(tmp_path / "d", local_s3, bucket))


def test_a_store_that_ignores_put_if_absent_is_refused(tmp_path, local_s3, bucket):
    with LocalS3(honour_conditional_writes=False) as careless:
        s = s3_settings(tmp_path, careless, careless.create_bucket("mem"))
        with pytest.raises(MemoryStoreError, match=r"ignores conditional writes.*overwrite "
                                                   r"each other.*s3\+ddb"):
            MemoryManager(s, HashEmbedder(dim=384), auto_maintain=False)
        assert not careless.keys("mem", "a4ps/_a4ps_probe/")       # the probe cleaned up
    # the honest store passes the same check, and leaves no probe behind
    MemoryManager(s3_settings(tmp_path, local_s3, bucket), HashEmbedder(dim=384),
                  auto_maintain=False).close()
    assert not local_s3.keys(bucket, "a4ps/_a4ps_probe/")


def test_bad_uri_and_missing_bucket_are_explained(tmp_path, local_s3):
    with pytest.raises(SettingsError, match=r"memory.uri.*object-store URI"):
        load_settings(data_dir=tmp_path, memory={"uri": "ftp://host/mem"})
    s = s3_settings(tmp_path, local_s3, "no-such-bucket")
    with pytest.raises(MemoryStoreError, match=r"s3://no-such-bucket/a4ps.*bucket exist"):
        MemoryManager(s, HashEmbedder(dim=384), auto_maintain=False)
