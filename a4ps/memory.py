"""Long-term memory on LanceDB (``settings.memory_dir``, or object storage by setting).

One table, ``memories``, with a ``kind`` column ("interaction" | "note" |
"reflection"), the text, its embedding (``vector``, the embedder's dim), persona, task
id, timestamp, the task's dissonance, a ``curated`` flag the curator sets, and ``meta``
(a JSON string, so the schema never changes when callers add fields).

Design notes (lancedb 0.40):
- We embed with our own embedder and store plain vectors. LanceDB's embedding registry
  would write the model's absolute path into the table schema, which breaks the moment
  the venv moves.
- ``memory.uri = "s3://bucket/path"`` (with ``memory.storage_options``: endpoint,
  region, credentials) keeps the table in object storage. Lance commits each version
  with a put-if-absent (``If-None-Match: *``), so concurrent writers on S3 (or an
  S3-compatible store that honours it) never overwrite each other's commits.
- The connection uses ``read_consistency_interval=timedelta(0)``, so a second process
  (``a4ps memory search`` next to a running daemon) sees the daemon's writes at once.
- Writes from this process are serialised by a lock; reads never take it. LanceDB
  reads a consistent table version, so searches run safely while rows are appended.
- Writers in other processes (daemons sharing one memory) race for each version: the
  loser's manifest put is refused (412) and Lance rebases and retries, for about 30 s.
  Past that it raises "Too many concurrent writers" / "Commit conflict"; :meth:`_commit`
  then waits, checks whether the write landed after all (an append is all-or-nothing,
  so one id tells) and otherwise runs it again, until ``memory.commit_retry_s``. An
  add's reruns insert only the ids not yet in the table (``merge_insert("id")``, given
  the time left as its timeout), so an earlier attempt that lands late and is visible
  by the time a rerun reads the table is not stored again. One window stays open: an
  earlier attempt whose manifest put is still in flight (its response lost, or the
  store slow) and only becomes visible after the rerun read the table. Lance does not
  treat two inserts as conflicting, so both land and the row is stored twice; and a
  put that lands after the final check makes the error below say nothing was visible
  when the row is in fact stored. Both need a put to stay in flight for seconds.
- The bound: the first attempt is a plain ``table.add`` (the fast path), which LanceDB
  retries for ~30 s whatever ``commit_retry_s`` says; reruns of an add get the time
  that is left (at least ``_RERUN_MIN_S``); reruns of an update, delete or index build
  (no timeout in LanceDB's API for them) can each take ~30 s again, and the deadline is
  only checked after each. So an add gives up after about ``max(commit_retry_s, 30 s)``
  + 13 s (one backoff sleep, at most 12 s, and the 1 s minimum), an update or delete
  after about ``commit_retry_s`` + 42 s; then the caller gets a
  :class:`MemoryStoreError`. A row is never dropped silently.
- All of that needs a store whose put-if-absent is atomic. On ``s3://`` the manager
  checks at open that a second put-if-absent of one probe key is refused, and refuses a
  store that ignores the header (``memory.check_put_if_absent``). Atomicity itself
  cannot be probed: moto 5.2 honoured the header but not atomically (tests/s3_server.py).
- Small tables are searched exactly (brute force is a few ms for thousands of rows).
  Once ``memory.index_min_rows`` rows exist, :meth:`MemoryManager.ensure_index` builds an
  ANN index (IVF-HNSW-SQ by default, or IVF-PQ) with cosine distance, then measures
  recall@10 against brute force and picks the cheapest query settings (HNSW ``ef``,
  ``refine_factor``, ``nprobes``) that reach it; they are saved beside the table.
  IVF-PQ alone loses recall badly, so its queries always re-rank (``refine_factor``). Rows added after the index is built are still found (LanceDB
  scans unindexed rows exactly); :meth:`maintain` folds them in and compacts the many
  small fragments single-row appends create. ``add`` schedules it in the background.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence, TypeVar,
                    runtime_checkable)

import numpy as np

if TYPE_CHECKING:
    from .config import Settings
    from .events import Bus
    from .models.embeddings import Embedder

log = logging.getLogger(__name__)

KINDS = ("interaction", "note", "reflection")
TABLE = "memories"
_RECALL_TARGET = 0.95
_RECALL_QUERIES = 100
# Tune to a margin above the target: 100 probe queries measure recall to about +-0.02.
_TUNE_TARGET = 0.97
# Probe queries are stored vectors nudged by a vector of this norm (cos ~0.95).
_PROBE_NOISE = 0.3
_MAX_NPROBES = 512
# add() runs maintain() in the background after this many appends (compaction keeps
# single-row appends from piling up thousands of tiny fragments).
_MAINTAIN_EVERY = 32
_COLUMNS = ["id", "kind", "text", "persona", "task_id", "ts", "dissonance", "curated", "meta"]
# What LanceDB's errors say when a commit lost to other writers (lance's
# TooMuchWriteContention, CommitConflict, RetryableCommitConflict): the write did not
# happen and may be run again on the newer version.
_CONFLICT_MARKERS = ("too many concurrent writers", "commit conflict", "toomuchwritecontention",
                     "commitconflict")
_RETRY_FIRST_S = 1.0    # LanceDB already retried for ~30 s; a second more is nothing
_RETRY_MAX_S = 8.0
_RERUN_MIN_S = 1.0      # a rerun with less time than this left still gets this much
_TIMED_OUT = "merge insert timed out"    # lancedb 0.40's text when a rerun's timeout hit
_sleep = time.sleep     # the retry's backoff (tests replace it to order a late landing)
_T = TypeVar("_T")


def is_commit_conflict(error: BaseException) -> bool:
    """True when ``error`` is LanceDB saying other writers won the commit."""
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, Exception) and any(m in text for m in _CONFLICT_MARKERS)


class MemoryStoreError(RuntimeError):
    """Memory store problem with a message that says what to do next."""


@dataclass
class MemoryRecord:
    id: str
    kind: str
    text: str
    persona: str = ""
    task_id: str = ""
    ts: float = 0.0
    dissonance: float = 0.0
    curated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    # search() only: cosine distance to the query and 1 - distance (cosine similarity).
    distance: float | None = None
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IndexReport:
    """What :meth:`MemoryManager.ensure_index` did."""

    rows: int
    indexed: bool
    built: bool = False
    index_type: str | None = None
    recall_at_10: float | None = None
    nprobes: int | None = None
    refine_factor: int | None = None   # None: no re-ranking needed
    ef: int | None = None              # HNSW beam width (None: LanceDB default)
    seconds: float = 0.0
    note: str = ""


def _quote(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _id_in(ids: Iterable[str]) -> str:
    """SQL predicate matching rows whose id is one of ``ids``."""
    return f"id IN ({', '.join(map(_quote, ids))})"


def _record(row: dict[str, Any]) -> MemoryRecord:
    meta = row.get("meta") or "{}"
    try:
        meta = json.loads(meta)
    except ValueError:
        meta = {"raw": meta}
    dist = row.get("_distance")
    return MemoryRecord(
        id=row["id"], kind=row["kind"], text=row["text"], persona=row.get("persona") or "",
        task_id=row.get("task_id") or "", ts=float(row.get("ts") or 0.0),
        dissonance=float(row.get("dissonance") or 0.0), curated=bool(row.get("curated")),
        meta=meta if isinstance(meta, dict) else {"value": meta},
        distance=None if dist is None else float(dist),
        score=None if dist is None else 1.0 - float(dist))


@runtime_checkable
class MemoryStore(Protocol):
    """The long-term memory seam the graph and the services use (:class:`MemoryManager`
    on LanceDB is the one implementation; tests may pass a smaller one)."""

    def add(self, text: str, *, kind: str = "interaction", persona: str = "",
            task_id: str = "", dissonance: float = 0.0,
            meta: dict[str, Any] | None = None) -> str: ...

    def search(self, query: str | Sequence[float] | np.ndarray, k: int = 5, *,
               kind: str | None = None, filters: str | None = None,
               hybrid: bool = False) -> list[MemoryRecord]: ...

    def recent(self, n: int = 10, *, uncurated_only: bool = False,
               kind: str | None = None) -> list[MemoryRecord]: ...

    def mark_curated(self, ids: Iterable[str]) -> int: ...

    def count(self, kind: str | None = None) -> int: ...


class MemoryManager:
    """The system's long-term memory. Build one per process: ``MemoryManager(settings,
    embedder, bus)``; it opens (or creates) the table at ``settings.memory_dir``."""

    def __init__(self, settings: Settings, embedder: Embedder, bus: Bus | None = None, *,
                 auto_maintain: bool = True) -> None:
        import lancedb
        import pyarrow as pa

        self.settings = settings
        self.embedder = embedder
        self.bus = bus
        self.dim = int(embedder.dim)
        self.uri = settings.memory_uri
        self.remote = settings.memory_is_remote
        self.path = settings.memory_dir      # local store (and its index tuning file)
        if not self.remote:
            self.path.mkdir(parents=True, exist_ok=True)
        self.auto_maintain = auto_maintain
        mem = settings.memory
        self.index_min_rows = int(mem.index_min_rows)
        self.index_type = str(getattr(mem, "index_type", "ivf_hnsw_sq"))
        self.nprobes = int(mem.nprobes)
        # None = no re-ranking; ensure_index() picks the cheapest setting that
        # reaches the recall target.
        self.refine_factor: int | None = int(mem.refine_factor)
        self.ef: int | None = None   # HNSW beam width; None = LanceDB's default
        self._wlock = threading.Lock()       # this process's writes, one at a time
        self._mlock = threading.Lock()       # one maintain()/ensure_index() at a time
        self._maint_thread: threading.Thread | None = None
        self._adds = 0
        self.commit_retry_s = float(mem.commit_retry_s)
        self.commit_retries = 0     # writes run again after losing to other writers
        self._closed = False
        self.last_index_report: IndexReport | None = None
        self.schema = pa.schema([
            ("id", pa.string()), ("kind", pa.string()), ("text", pa.string()),
            ("vector", pa.list_(pa.float32(), self.dim)), ("persona", pa.string()),
            ("task_id", pa.string()), ("ts", pa.float64()), ("dissonance", pa.float64()),
            ("curated", pa.bool_()), ("meta", pa.string()),
        ])
        try:
            self._open(lancedb)
        except MemoryStoreError:
            raise
        except Exception as e:
            if not self.remote:
                raise
            raise MemoryStoreError(
                f"cannot open the memory at {self.uri}: {type(e).__name__}: "
                f"{str(e)[:300]}; check memory.uri (does the bucket exist?) and "
                f"memory.storage_options (endpoint, region, credentials)") from e
        if self.uri.startswith("s3://") and mem.check_put_if_absent:
            self._check_put_if_absent()
        vtype = self.table.schema.field("vector").type
        have = getattr(vtype, "list_size", None)
        if have != self.dim:
            raise MemoryStoreError(
                f"memory table at {self.uri} stores {have}-d vectors but the embedder "
                f"gives {self.dim}-d; use the embedder it was built with, or move "
                f"{self.uri} aside to start a new memory")
        self._indexed = self._has_index()
        self._fts = False
        if self._indexed:
            self._load_tuning()

    def _open(self, lancedb: Any) -> None:
        """Connect (locally, or to object storage with its options) and open the table."""
        options = dict(self.settings.memory.storage_options) if self.remote else None
        self._db = lancedb.connect(self.uri, read_consistency_interval=timedelta(0),
                                   storage_options=options)
        try:
            self.table = self._db.open_table(TABLE)
        except (ValueError, FileNotFoundError):
            try:
                self.table = self._db.create_table(TABLE, schema=self.schema)
            except (ValueError, OSError):  # another process created it meanwhile
                self.table = self._db.open_table(TABLE)

    def _check_put_if_absent(self) -> None:
        """Refuse an S3 store that ignores ``If-None-Match: *``: Lance commits every
        version with it, and on a store that ignores it two writers silently replace
        each other's versions (rows lost). Only positive evidence refuses; a probe that
        cannot run (credentials boto3 does not find, say) is logged and skipped."""
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import ClientError
        except ImportError:   # pragma: no cover - boto3 is in requirements.txt
            return
        opts = {k.lower(): v for k, v in self.settings.memory.storage_options.items()}

        def opt(*names: str) -> str | None:
            return next((opts[n] for n in names if opts.get(n)), None)
        bucket, _, prefix = self.uri[len("s3://"):].partition("/")
        key = "/".join(p for p in (prefix.strip("/"), "_a4ps_probe", uuid.uuid4().hex) if p)
        client = boto3.client(
            "s3", endpoint_url=opt("aws_endpoint", "aws_endpoint_url", "endpoint"),
            region_name=opt("aws_region", "region", "aws_default_region"),
            aws_access_key_id=opt("aws_access_key_id", "access_key_id"),
            aws_secret_access_key=opt("aws_secret_access_key", "secret_access_key"),
            aws_session_token=opt("aws_session_token", "session_token", "aws_token"),
            config=Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 2}))
        ignored = False
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")
            try:
                client.put_object(Bucket=bucket, Key=key, Body=b"2", IfNoneMatch="*")
                ignored = True
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in (412, 409):
                    raise
        except Exception as e:
            log.warning("memory: could not check that %s refuses a second put-if-absent "
                        "(%s: %s); continuing", self.uri, type(e).__name__, str(e)[:200])
        finally:
            try:
                client.delete_object(Bucket=bucket, Key=key)
            except Exception:
                pass
        if ignored:
            raise MemoryStoreError(
                f"the object store behind {self.uri} ignores conditional writes "
                f"(If-None-Match: *): a second put-if-absent of one key succeeded. LanceDB "
                f"commits rely on it; there, two writers silently overwrite each other's "
                f"memories. Use a store that supports it (AWS S3, recent MinIO, R2), "
                f"memory.uri = 's3+ddb://...' with a DynamoDB commit table, or (one writer "
                f"only) memory.check_put_if_absent = false")

    # -- helpers ----------------------------------------------------------------------
    @property
    def _tuning_path(self) -> Path:
        # object storage: the tuning stays with this daemon's data (a restart keeps it;
        # another daemon on the same memory tunes its own, from the safe defaults)
        if self.remote:
            return self.settings.data_dir / "memory_index_tuning.json"
        return self.path / "index_tuning.json"

    def _load_tuning(self) -> None:
        """Query settings ensure_index() chose, so a restart keeps the fast ones."""
        try:
            t = json.loads(self._tuning_path.read_text())
            if t.get("index_type") == self.index_type:
                self.nprobes = int(t["nprobes"])
                self.refine_factor = t["refine_factor"] and int(t["refine_factor"])
                self.ef = t.get("ef") and int(t["ef"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no (valid) file: the configured settings are the safe default

    def _save_tuning(self, recall: float) -> None:
        tmp = self._tuning_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"index_type": self.index_type, "nprobes": self.nprobes,
                                   "refine_factor": self.refine_factor,
                                   "ef": self.ef, "recall_at_10": recall}))
        tmp.replace(self._tuning_path)

    def _has_index(self) -> bool:
        try:
            return any("vector" in i.columns and i.index_type != "FTS"
                       for i in self.table.list_indices())
        except Exception:  # pragma: no cover - listing indices never matters for correctness
            return False

    def _embed(self, texts: list[str]) -> np.ndarray:
        vecs = np.asarray(self.embedder.embed(texts), dtype=np.float32)
        if vecs.shape != (len(texts), self.dim):
            raise MemoryStoreError(f"embedder returned shape {vecs.shape} for {len(texts)} "
                               f"texts; expected ({len(texts)}, {self.dim})")
        return vecs

    def _vector(self, v: Any) -> np.ndarray:
        vec: np.ndarray = np.asarray(v, dtype=np.float32).reshape(-1)
        if vec.size != self.dim:
            raise ValueError(f"query vector has {vec.size} values; memory uses {self.dim}")
        return vec

    @staticmethod
    def _check_kind(kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"memory kind must be one of {KINDS}, got {kind!r}")
        return kind

    def _publish_log(self, level: str, message: str) -> None:
        if self.bus is not None:
            self.bus.log(level, message, source="memory")
        else:
            log.log(logging.WARNING if level == "warning" else logging.INFO, message)

    # -- writes -----------------------------------------------------------------------
    def add(self, text: str, *, kind: str = "interaction", persona: str = "",
            task_id: str = "", dissonance: float = 0.0,
            meta: dict[str, Any] | None = None) -> str:
        """Embed ``text`` and store it; returns the new record's id."""
        return self.add_many([dict(text=text, kind=kind, persona=persona, task_id=task_id,
                                   dissonance=dissonance, meta=meta)])[0]

    def add_many(self, entries: Sequence[dict[str, Any]],
                 vectors: np.ndarray | None = None) -> list[str]:
        """Store several records in one write (one LanceDB version, one fragment).

        Each entry has ``text`` and optionally kind/persona/task_id/dissonance/meta/ts.
        ``vectors`` (n, dim) skips embedding (benchmarks, re-imports).
        """
        import pyarrow as pa

        entries = list(entries)
        if not entries:
            return []
        for e in entries:
            if not isinstance(e.get("text"), str) or not e["text"].strip():
                raise ValueError("memory text must be a non-empty string")
            self._check_kind(e.get("kind", "interaction"))
            if e.get("meta") is not None and not isinstance(e["meta"], dict):
                raise ValueError("memory meta must be a dict")
        if vectors is None:
            vecs = self._embed([e["text"] for e in entries])
        else:
            vecs = np.asarray(vectors, dtype=np.float32)
            if vecs.shape != (len(entries), self.dim):
                raise ValueError(f"vectors shape {vecs.shape}; expected ({len(entries)}, {self.dim})")
        if not np.all(np.isfinite(vecs)):
            raise MemoryStoreError("embedder returned non-finite values; not storing them")
        now = time.time()
        ids = [uuid.uuid4().hex for _ in entries]
        data = pa.table({
            "id": ids,
            "kind": [e.get("kind", "interaction") for e in entries],
            "text": [e["text"] for e in entries],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), self.dim),
            "persona": [str(e.get("persona") or "") for e in entries],
            "task_id": [str(e.get("task_id") or "") for e in entries],
            "ts": [float(e.get("ts") or now) for e in entries],
            "dissonance": [float(e.get("dissonance") or 0.0) for e in entries],
            "curated": [bool(e.get("curated", False)) for e in entries],
            "meta": [json.dumps(e.get("meta") or {}, default=str, ensure_ascii=False)
                     for e in entries],
        }, schema=self.schema)
        with self._wlock:
            self._commit(f"storing {len(ids)} memories", lambda: self.table.add(data),
                         landed=lambda: self._has_id(ids[0]),
                         rerun=lambda left: self._insert_missing(data, left))
            self._adds += 1
            due = self.auto_maintain and self._adds % _MAINTAIN_EVERY == 0
        if due or (self.auto_maintain and not self._indexed and len(entries) > 1
                   and self.table.count_rows() >= self.index_min_rows):
            self.maintain_in_background()
        return ids

    def mark_curated(self, ids: Iterable[str]) -> int:
        """Flag records as seen by the curator; returns how many rows changed."""
        ids = [str(i) for i in ids]
        if not ids:
            return 0
        with self._wlock:   # setting a flag twice is harmless: a lost update just reruns
            res = self._commit(f"marking {len(ids)} memories curated",
                               lambda: self.table.update(where=_id_in(ids),
                                                         values={"curated": True}))
        return int(getattr(res, "rows_updated", len(ids)))

    def delete(self, ids: Iterable[str]) -> None:
        """Remove records by id (an import's undo); deleting twice is harmless, so a
        delete that lost the commit to another writer just runs again."""
        ids = [str(i) for i in ids]
        with self._wlock:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                self._commit(f"deleting {len(chunk)} memories",
                             lambda: self.table.delete(_id_in(chunk)))

    def _has_id(self, memory_id: str) -> bool:
        return int(self.table.count_rows(f"id = {_quote(memory_id)}")) > 0

    def _insert_missing(self, data: Any, timeout_s: float) -> Any:
        """Insert the rows of ``data`` whose id is not in the table yet, within
        ``timeout_s`` (an add's rerun: an earlier attempt may have landed meanwhile)."""
        return (self.table.merge_insert("id").when_not_matched_insert_all()
                .execute(data, timeout=timedelta(seconds=timeout_s)))

    def _commit(self, what: str, write: Callable[[], _T],
                landed: Callable[[], bool] | None = None,
                rerun: Callable[[float], Any] | None = None) -> _T | None:
        """Run one LanceDB write; when other writers keep winning the commit, check
        ``landed`` (did it commit although LanceDB reported a conflict?) and otherwise
        run it again with jittered backoff, for up to ``memory.commit_retry_s``.

        ``rerun(seconds_left)``, when given, replaces ``write`` on the reruns: an add
        passes an insert of the ids not yet present, bounded by the time left."""
        deadline = time.monotonic() + self.commit_retry_s
        delay, attempts = _RETRY_FIRST_S, 0
        while True:
            attempts += 1
            try:
                if attempts == 1 or rerun is None:
                    return write()
                rerun(max(deadline - time.monotonic(), _RERUN_MIN_S))
                return None
            except Exception as e:
                # a rerun cancelled at its timeout may still land: treat it as lost
                timed_out = attempts > 1 and rerun is not None and _TIMED_OUT in str(e)
                if not (is_commit_conflict(e) or timed_out):
                    raise
                # LanceDB's retry budget can expire with a manifest put still in flight:
                # wait before looking, so a late landing is seen and not written twice
                _sleep(delay * random.uniform(0.5, 1.5))
                if landed is not None and landed():
                    log.info("memory: %s committed although LanceDB reported: %s", what, e)
                    return None
                if time.monotonic() >= deadline:
                    raise MemoryStoreError(
                        f"memory at {self.uri}: {what} failed: other writers won the commit "
                        f"{attempts} time(s) over {self.commit_retry_s:.0f} s (last: "
                        f"{str(e)[:200]}); it had not taken effect when last checked, "
                        f"though an attempt still in flight may yet land (look for it "
                        f"before writing it again). Retry later, raise "
                        f"memory.commit_retry_s, or give fewer daemons this memory") from e
                self.commit_retries += 1
                log.info("memory: %s lost a commit to another writer (attempt %d), "
                         "retrying: %s", what, attempts, str(e)[:200])
                delay = min(delay * 2, _RETRY_MAX_S)

    # -- reads ------------------------------------------------------------------------
    def search(self, query: str | Sequence[float] | np.ndarray, k: int = 5, *,
               kind: str | None = None, filters: str | None = None,
               hybrid: bool = False) -> list[MemoryRecord]:
        """Nearest ``k`` memories to ``query`` (text, or a vector), closest first.

        ``filters`` is a LanceDB SQL predicate over the columns, e.g.
        ``"persona = 'BRICK' AND dissonance < 0.3"``; it is applied before the vector
        search, so ``k`` results come back whenever that many rows match.
        ``hybrid=True`` (text queries) fuses the vector ranking with BM25 full-text
        ranking (reciprocal rank fusion): exact names, codes and rare words that an
        embedding blurs are still found. ``score`` is then the fused relevance.
        """
        if k <= 0:
            return []
        if isinstance(query, str):
            if not query.strip():
                return []
            vec = self._embed([query])[0]
        else:
            vec = self._vector(query)
            hybrid = False          # full-text ranking needs the query's text
        where = self._where(kind, filters)
        if hybrid:
            self._ensure_fts()
            q = (self.table.search(query_type="hybrid", vector_column_name="vector")
                 .vector(vec).text(query).distance_type("cosine").limit(int(k)))
        else:
            q = (self.table.search(vec, vector_column_name="vector")
                 .distance_type("cosine").limit(int(k)))
        if where:
            q = q.where(where, prefilter=True)
        if self._indexed:
            q = self._ann(q)
        try:
            if hybrid:
                rows = q.to_list()
            else:
                rows = q.select(_COLUMNS + ["_distance"]).to_list()
        except Exception as e:
            if filters:
                raise ValueError(f"memory search filter {filters!r} failed: {e}") from e
            raise
        out = [_record(r) for r in rows]
        if hybrid:
            for rec, row in zip(out, rows):
                rec.score = float(row.get("_relevance_score") or 0.0)
        return out

    def _ensure_fts(self) -> None:
        """Full-text (BM25) index on ``text``, built on first hybrid search; rows added
        later are folded in by :meth:`maintain` (and searched unindexed meanwhile)."""
        if self._fts:
            return
        from lancedb.index import FTS

        with self._mlock:
            if not any("text" in i.columns for i in self.table.list_indices()):
                # a search must not fail because another daemon committed meanwhile
                self._commit("building the full-text index",
                             lambda: self.table.create_index("text", config=FTS(), replace=True))
            self._fts = True

    def _ann(self, q: Any) -> Any:
        q = q.nprobes(self.nprobes)
        if self.ef:
            q = q.ef(self.ef)
        return q.refine_factor(self.refine_factor) if self.refine_factor else q

    def _where(self, kind: str | None, filters: str | None,
               extra: str | None = None) -> str | None:
        parts = []
        if kind is not None:
            parts.append(f"kind = {_quote(self._check_kind(kind))}")
        if filters:
            parts.append(f"({filters})")
        if extra:
            parts.append(extra)
        return " AND ".join(parts) or None

    def recent(self, n: int = 10, *, uncurated_only: bool = False,
               kind: str | None = None) -> list[MemoryRecord]:
        """The ``n`` newest records (by ts, newest first)."""
        import pyarrow.compute as pc

        if n <= 0:
            return []
        where = self._where(kind, None, "curated = false" if uncurated_only else None)
        q = self.table.search()
        if where:
            q = q.where(where)
        # Two passes: find the newest ids from (id, ts) only, then fetch those rows.
        keys = q.select(["id", "ts"]).limit(None).to_arrow()
        if keys.num_rows == 0:
            return []
        order = pc.sort_indices(keys, sort_keys=[("ts", "descending")])[:n]
        ids = keys["id"].take(order).to_pylist()
        rows = {r["id"]: r for r in self._fetch(ids)}
        return [_record(rows[i]) for i in ids if i in rows]

    def _fetch(self, ids: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = (self.table.search().where(_id_in(ids)).select(_COLUMNS)
                                      .limit(len(ids)).to_list())
        return rows

    def get(self, memory_id: str) -> MemoryRecord:
        rows = self._fetch([str(memory_id)])
        if not rows:
            raise KeyError(f"no memory with id {memory_id!r}")
        return _record(rows[0])

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return int(self.table.count_rows())
        return int(self.table.count_rows(f"kind = {_quote(self._check_kind(kind))}"))

    # -- index and maintenance -------------------------------------------------------
    def _index_config(self) -> Any:
        from lancedb.index import IvfHnswSq, IvfPq

        if self.index_type == "ivf_pq":
            # 8 dims per sub-vector: small codes; refine_factor restores the recall.
            # PQ needs sub-vectors that divide dim exactly.
            subs = next(n for n in range(max(1, self.dim // 8), 0, -1) if self.dim % n == 0)
            return IvfPq(distance_type="cosine", num_sub_vectors=subs)
        if self.index_type == "ivf_hnsw_sq":
            return IvfHnswSq(distance_type="cosine")
        raise MemoryStoreError(f"memory.index_type {self.index_type!r} is not supported; "
                           "use 'ivf_hnsw_sq' or 'ivf_pq'")

    def ensure_index(self, *, force: bool = False) -> IndexReport:
        """Build the ANN index once the table has ``index_min_rows`` rows (or ``force``),
        then tune ``nprobes`` until recall@10 against brute force reaches 0.95."""
        with self._mlock:
            rows = self.count()
            if self._indexed or self._has_index():
                self._indexed = True
                rep = IndexReport(rows=rows, indexed=True, index_type=self.index_type,
                                  nprobes=self.nprobes, refine_factor=self.refine_factor,
                                  ef=self.ef, note="index exists")
                if self.last_index_report and self.last_index_report.recall_at_10 is not None:
                    rep.recall_at_10 = self.last_index_report.recall_at_10
                return rep
            if rows < self.index_min_rows and not force:
                return IndexReport(rows=rows, indexed=False,
                                   note=f"{rows} rows < memory.index_min_rows="
                                        f"{self.index_min_rows}; exact search is used")
            if rows < 256:
                return IndexReport(rows=rows, indexed=False,
                                   note="an ANN index needs at least 256 rows to train")
            t0 = time.perf_counter()
            self._publish_log("info", f"memory: building {self.index_type} index over {rows} rows")
            # No write lock: LanceDB commits appends made meanwhile; they stay searchable
            # as unindexed rows until the next maintain().
            self.table.create_index("vector", config=self._index_config(), replace=True)
            self._indexed = True
            recall = self._tune_recall()
            self._save_tuning(recall)
            rep = IndexReport(rows=rows, indexed=True, built=True, index_type=self.index_type,
                              recall_at_10=recall, nprobes=self.nprobes,
                              refine_factor=self.refine_factor, ef=self.ef,
                              seconds=time.perf_counter() - t0)
            if recall < _RECALL_TARGET:
                rep.note = (f"recall@10 {recall:.2f} < {_RECALL_TARGET} even at nprobes="
                            f"{self.nprobes}; raise memory.refine_factor or use "
                            "memory.index_type='ivf_hnsw_sq'")
                self._publish_log("warning", "memory: " + rep.note)
            else:
                self._publish_log("info", f"memory: index ready in {rep.seconds:.1f}s, "
                                          f"recall@10 {recall:.3f} at nprobes={self.nprobes}")
            self.last_index_report = rep
            return rep

    def _recall_probe(self, n_queries: int, k: int,
                      seed: int) -> list[tuple[np.ndarray, set[str]]]:
        """Queries near stored vectors (a paraphrase-sized nudge) and their exact top-k."""
        keys = self.table.search().select(["id"]).limit(None).to_arrow()["id"].to_pylist()
        if not keys:
            return []
        rng = np.random.default_rng(seed)
        pick = [keys[int(i)] for i in rng.choice(len(keys), min(n_queries, len(keys)),
                                                  replace=False)]
        rows = (self.table.search().where(_id_in(pick))
                .select(["vector"]).limit(len(pick)).to_arrow())
        vecs = np.asarray(rows["vector"].to_pylist(), dtype=np.float32)
        vecs += (_PROBE_NOISE / np.sqrt(self.dim)) * rng.standard_normal(vecs.shape).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        probe: list[tuple[np.ndarray, set[str]]] = []
        for v in vecs:
            exact = (self.table.search(v, vector_column_name="vector").distance_type("cosine")
                     .limit(k).bypass_vector_index().select(["id", "_distance"]).to_arrow())
            probe.append((v, set(exact["id"].to_pylist())))
        return probe

    def _recall(self, probe: list[tuple[np.ndarray, set[str]]], k: int) -> float:
        if not probe:
            return 1.0
        hits = 0
        for v, exact in probe:
            ann = self._ann(self.table.search(v, vector_column_name="vector")
                            .distance_type("cosine").limit(k)).select(["id", "_distance"])
            hits += len(exact & set(ann.to_arrow()["id"].to_pylist()))
        return hits / (k * len(probe))

    def measure_recall(self, n_queries: int = _RECALL_QUERIES, k: int = 10,
                       seed: int = 0) -> float:
        """recall@k of the current query settings against brute force."""
        return self._recall(self._recall_probe(n_queries, k, seed), k)

    def _tune_recall(self) -> float:
        """Cheapest query settings whose recall@10 reaches the tuning target.

        A ladder from cheap to dear: IVF-HNSW-SQ first widens the HNSW beam (``ef``,
        nearly free), then re-ranks with full vectors (``refine_factor``, ~+3 ms);
        IVF-PQ always re-ranks. Then ``nprobes`` doubles up to a cap. The probe (and its
        exact answers) is computed once and reused for every rung.
        """
        probe = self._recall_probe(_RECALL_QUERIES, 10, 0)
        rf, base = int(self.settings.memory.refine_factor), self.nprobes
        ladder: list[tuple[int, int | None, int | None]] = []
        if self.index_type == "ivf_hnsw_sq":
            ladder += [(base, None, None), (base, 64, None), (base, 128, None),
                       (base, 256, None), (base, 128, rf)]
        else:
            ladder += [(base, None, rf)]
        npb = base
        while npb < _MAX_NPROBES:
            npb = min(_MAX_NPROBES, npb * 2)
            ladder.append((npb, 256 if self.index_type == "ivf_hnsw_sq" else None, rf))
        recall = 0.0
        for self.nprobes, self.ef, self.refine_factor in ladder:
            recall = self._recall(probe, 10)
            if recall >= _TUNE_TARGET:
                break
        return recall

    def maintain(self) -> IndexReport:
        """Compact fragments, fold new rows into the index, build it when due."""
        with self._wlock:   # compaction rewrites fragments; keep our own writes out
            try:
                self.table.optimize()
            except Exception as e:  # a conflicting writer in another process: try later
                log.warning("memory optimize skipped: %s", e)
        return self.ensure_index()

    def maintain_in_background(self) -> bool:
        """Start :meth:`maintain` on a daemon thread unless one is running."""
        with self._mlock:
            t = self._maint_thread
            if self._closed or (t is not None and t.is_alive()):
                return False

            def run() -> None:
                try:
                    self.maintain()
                except Exception:
                    log.exception("memory maintenance failed (search still works, exact)")

            self._maint_thread = threading.Thread(target=run, name="memory-maintain",
                                                  daemon=True)
            self._maint_thread.start()
            return True

    def close(self, timeout: float = 60.0) -> None:
        """Wait for background maintenance (so a stop never interrupts an index write)."""
        self._closed = True
        t = self._maint_thread
        if t is not None:
            t.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {"rows": self.count(), "indexed": self._indexed, "index_type": self.index_type,
                "nprobes": self.nprobes, "refine_factor": self.refine_factor, "ef": self.ef,
                "recall_at_10": (self.last_index_report.recall_at_10
                                 if self.last_index_report else None)}
