"""Long-term memory on object storage (``memory.uri = "s3://bucket/path"``) against a
real local S3 server (moto, tests/s3_server.py): the same MemoryManager API, nothing on
local disk, another data directory sees the same memories, a reader and a writer in
separate processes at once, two writers at once, and clear errors for a bad bucket."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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


def _worker(data_dir: Path, who: str, n: int, local_s3: LocalS3, bucket: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT),
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


def test_bad_uri_and_missing_bucket_are_explained(tmp_path, local_s3):
    with pytest.raises(SettingsError, match=r"memory.uri.*object-store URI"):
        load_settings(data_dir=tmp_path, memory={"uri": "ftp://host/mem"})
    s = s3_settings(tmp_path, local_s3, "no-such-bucket")
    with pytest.raises(MemoryStoreError, match=r"s3://no-such-bucket/a4ps.*bucket exist"):
        MemoryManager(s, HashEmbedder(dim=384), auto_maintain=False)
