"""Personas as portable files (after Letta's agent file, ``.af``).

``PersonaFiles.export(NAME, FILE)`` writes one persona with everything that makes it
itself into one zip archive; ``PersonaFiles.import_(FILE, as_name=...)`` brings it into
this image (another machine, or the same one under another name)::

    manifest.json    format version, A4PS version, the persona, its embedder (id, dim),
                     its base model, and the sha256 and size of every other member
    proto.json       the proto: own slots and method sources, its parent, and the
                     inherited slots and methods it relied on
    codex.json       its codex entry (role, description, principles) and their history
    memories.jsonl   its memories (rows) and vectors.npy (their embeddings, n x dim)
    adapter/...      its live LoRA adapter (PEFT files), when it has one
    golden.jsonl     its golden data (only with ``golden=True``)

Import checks everything before it changes anything: the archive (truncated? members
named outside the archive, links, encryption, a member bigger than the limits — a zip
bomb is refused from its declared sizes, and a member that inflates past what it
declares fails its CRC), the manifest (format and version, a file from a newer A4PS),
every member's size and sha256 against the manifest, the content (JSON, rows, vector
shape, method sources compile), the name (free here, valid), the parent proto, the
adapter's base model (present on this system's backend) and the free disk space. It
reads each member once, into a staging folder under the data dir, and installs from
there. Then, in order: the adapter folder, the memories (one write; re-embedded when
this system's embedder differs), the golden data, the codex entry, the proto, a save.
A failure part-way undoes the steps before it, so an import is all or nothing.

Errors::

    PersonaFileError (ValueError)   refused; the message says why and what to do
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .codex import CodexError, PersonaCodex
from .proto import Proto, ProtoError, compile_method
from .models.base import AdapterHost
from .models.embedded import checkpoint_dir, gguf_path
from .models.errors import ModelError
from .persona_file_errors import PersonaFileError as PersonaFileError  # its home

if TYPE_CHECKING:
    from .config import Settings

    from .codex import Codex
    from .memory import MemoryManager
    from .models.embeddings import Embedder
    from .models.manager import ModelManager
    from .events import EventBus
    from .proto import ProtoManager

log = logging.getLogger(__name__)

FORMAT = "a4ps-persona"
FORMAT_VERSION = 1
SUFFIX = ".a4persona"
MANIFEST = "manifest.json"
PARTS = ("proto.json", "codex.json", "memories.jsonl", "vectors.npy", "golden.jsonl")
_ADAPTER_MEMBER = re.compile(r"^adapter/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_CHUNK = 1 << 20
_MEMORY_COLUMNS = ["id", "kind", "text", "persona", "task_id", "ts", "dissonance", "curated",
                   "meta"]
LORA_TAG = "+lora:"            # the embedded backend's "<base>+lora:<adapter dir>" ids


@dataclass(frozen=True)
class ImportLimits:
    """What an import accepts before reading a byte of content."""

    max_member_bytes: int = 4 << 30      # one member (an adapter of a 7B model is ~100 MB)
    max_total_bytes: int = 16 << 30      # all members together
    max_members: int = 256
    max_manifest_bytes: int = 1 << 20


# -- the manifest ------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PartInfo(_Model):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class EmbedderInfo(_Model):
    id: str = Field(min_length=1, max_length=256)
    dim: int = Field(ge=1, le=65536)


class BaseModelInfo(_Model):
    id: str = Field(min_length=1, max_length=4096)
    backend: str = Field(min_length=1, max_length=64)


class AdapterInfo(_Model):
    version: int | None = None
    files: list[str]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")   # the format version decides compatibility
    format: Literal["a4ps-persona"]
    format_version: int = Field(ge=1)
    a4ps_version: str
    created_at: float
    persona: str = Field(pattern=_NAME.pattern)
    embedder: EmbedderInfo
    base_model: BaseModelInfo
    model_name: str
    adapter: AdapterInfo | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    parts: dict[str, PartInfo]


# -- plain data ------------------------------------------------------------------------------

def _json_value(value: Any, where: str) -> Any:
    """A slot value as JSON data, or a refusal naming the slot (a persona file carries
    data, never pickles)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PersonaFileError(f"{where} is {value}, which a persona file cannot hold")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise PersonaFileError(f"{where} has a non-text key {k!r}; a persona file "
                                       f"holds JSON data only")
            out[k] = _json_value(v, f"{where}.{k}")
        return out
    raise PersonaFileError(f"{where} holds a {type(value).__name__}, which a persona file "
                           f"cannot carry (JSON data only): change the slot, then export")


def embedder_id(embedder: Any) -> str:
    """A stable name for an embedder: vectors from two embedders with the same id and
    dimension are interchangeable."""
    explicit = getattr(embedder, "id", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    kind = type(embedder).__name__
    if kind == "MiniLMEmbedder":
        path = getattr(embedder, "model_path", None)
        return f"minilm:{Path(path).name}" if path else "all-MiniLM-L6-v2"
    if kind == "HashEmbedder":
        return f"hash-stand-in-{embedder.dim}"
    if kind == "OllamaEmbedder":
        return f"ollama:{embedder.model}"
    return kind


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _make_dirs(path: Path, undo: list[Callable[[], None]]) -> None:
    """``mkdir -p``, remembering to remove (if still empty) the folders it made."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):             # undo runs backwards: deepest folder first
        def remove_if_empty(d: Path = d) -> None:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        undo.append(remove_if_empty)


def _quote(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


# -- export --------------------------------------------------------------------------------------

class _ZipWriter:
    """Writes members and remembers each one's sha256 and size for the manifest."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self.zf = zf
        self.parts: dict[str, dict[str, Any]] = {}

    def _info(self, name: str, compress: bool) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        return info

    def put_bytes(self, name: str, data: bytes, *, compress: bool = True) -> None:
        self.zf.writestr(self._info(name, compress), data)
        self.parts[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def put_file(self, name: str, src: Path, *, compress: bool = False) -> None:
        h, size = hashlib.sha256(), 0
        with open(src, "rb") as f, self.zf.open(self._info(name, compress), "w",
                                                force_zip64=True) as out:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
        self.parts[name] = {"sha256": h.hexdigest(), "size": size}


# -- import: reading and checking ------------------------------------------------------------------

@dataclass
class PersonaArchive:
    """A persona file read and checked into ``staging`` (nothing installed yet)."""

    manifest: Manifest
    staging: Path
    proto: dict[str, Any]
    codex: dict[str, Any]
    rows: list[dict[str, Any]]
    vectors: np.ndarray
    golden: list[dict[str, Any]] = field(default_factory=list)

    @property
    def adapter_dir(self) -> Path | None:
        return self.staging / "adapter" if self.manifest.adapter else None


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or "\\" in name or ":" in name \
            or any(p in ("", ".") for p in parts[:-1]):
        return f"member {name!r} points outside the archive (path traversal)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"member {name!r} is a symbolic link"
    if info.flag_bits & 0x1:
        return f"member {name!r} is encrypted"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return f"member {name!r} uses an unsupported compression ({info.compress_type})"
    if name != MANIFEST and name not in PARTS and not _ADAPTER_MEMBER.match(name):
        return f"member {name!r} is not part of a persona file"
    return None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int,
                 out: Path | None = None) -> tuple[bytes | None, str, int]:
    """(content or None when written to ``out``, sha256, size); reads at most ``limit``
    bytes and fails on a CRC mismatch (a member that inflates past its declared size)."""
    h, size, buf = hashlib.sha256(), 0, io.BytesIO() if out is None else None
    try:
        with zf.open(info) as src, (open(out, "wb") if out is not None else
                                    contextlib.nullcontext(buf)) as dst:
            assert dst is not None               # a file, or the in-memory buffer
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise PersonaFileError(f"member {info.filename!r} holds more than "
                                           f"{limit} bytes; refused")
                h.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError) as e:
        raise PersonaFileError(f"member {info.filename!r} is damaged ({e}); the file is "
                               f"truncated or corrupt: export it again") from None
    return (buf.getvalue() if buf is not None else None), h.hexdigest(), size


def _json(data: bytes, member: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PersonaFileError(f"{member} is not valid JSON ({e})") from None


def _jsonl(data: bytes, member: str) -> list[dict[str, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PersonaFileError(f"{member} is not UTF-8 text ({e})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PersonaFileError(f"{member} line {i} is not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise PersonaFileError(f"{member} line {i} is not a JSON object")
        rows.append(row)
    return rows


def _check_row(row: dict[str, Any], i: int) -> None:
    """A memory row holds what MemoryManager.add_many stores, with the right types."""
    def bad(what: str) -> PersonaFileError:
        return PersonaFileError(f"memories.jsonl row {i}: {what}")
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        raise bad("no text")
    if row.get("kind") not in ("interaction", "note", "reflection"):
        raise bad(f"unknown kind {row.get('kind')!r}")
    for key in ("ts", "dissonance"):
        v = row.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not math.isfinite(v)):
            raise bad(f"{key} must be a number, not {v!r}")
    for key in ("id", "persona", "task_id"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise bad(f"{key} must be text")
    if not isinstance(row.get("curated", False), bool):
        raise bad("curated must be true or false")
    if row.get("meta") is not None and not isinstance(row["meta"], dict):
        raise bad("meta must be an object")


def read_persona_file(path: Path | str, staging: Path, limits: ImportLimits = ImportLimits()
                      ) -> PersonaArchive:
    """Read and check a persona file into ``staging`` (which must not exist yet).

    Raises PersonaFileError; the caller removes ``staging`` either way."""
    path = Path(path)
    if not path.is_file():
        raise PersonaFileError(f"no persona file at {path}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as e:
        raise PersonaFileError(f"{path} is not a persona file, or it is truncated or damaged "
                               f"({e}); export it again") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise PersonaFileError(f"{path} has {len(infos)} members; a persona file has at "
                                   f"most {limits.max_members}")
        seen: set[str] = set()
        for info in infos:
            problem = _member_problem(info)
            if problem:
                raise PersonaFileError(f"{path}: {problem}; refused, nothing was written")
            if info.filename in seen:
                raise PersonaFileError(f"{path}: member {info.filename!r} appears twice")
            seen.add(info.filename)
            if info.file_size > limits.max_member_bytes:
                raise PersonaFileError(
                    f"{path}: member {info.filename!r} declares {info.file_size:,} bytes, more "
                    f"than the {limits.max_member_bytes:,} a member may hold (a zip bomb?); "
                    f"refused, nothing was written")
        total = sum(i.file_size for i in infos)
        if total > limits.max_total_bytes:
            raise PersonaFileError(f"{path}: members declare {total:,} bytes together, more "
                                   f"than the {limits.max_total_bytes:,} allowed")
        if MANIFEST not in seen:
            raise PersonaFileError(f"{path} has no {MANIFEST}: not a persona file, or truncated")
        raw, _, _ = _read_member(zf, zf.getinfo(MANIFEST), limits.max_manifest_bytes)
        assert raw is not None                   # read into memory (no ``out``)
        manifest = _manifest(_json(raw, MANIFEST), path)
        declared = set(manifest.parts)
        if declared - seen:
            raise PersonaFileError(f"{path} lacks {sorted(declared - seen)} that its manifest "
                                   f"lists: the file is incomplete; export it again")
        if seen - declared - {MANIFEST}:
            raise PersonaFileError(f"{path} holds {sorted(seen - declared - {MANIFEST})} that "
                                   f"its manifest does not list (checksums missing); refused")
        for required in ("proto.json", "codex.json", "memories.jsonl", "vectors.npy"):
            if required not in declared:
                raise PersonaFileError(f"{path}: the manifest lists no {required}")
        free = shutil.disk_usage(staging.parent).free
        need = sum(p.size for p in manifest.parts.values())
        if need * 2 > free:   # staged copy + installed copy
            raise PersonaFileError(f"importing needs about {2 * need:,} bytes free under "
                                   f"{staging.parent}; {free:,} are free")
        staging.mkdir(parents=True)
        (staging / "adapter").mkdir()
        texts: dict[str, bytes] = {}
        for name, part in manifest.parts.items():
            info = zf.getinfo(name)
            if info.file_size != part.size:
                raise PersonaFileError(f"{name} is {info.file_size} bytes in the archive but "
                                       f"{part.size} in the manifest; the file was altered")
            out = staging / name if name.startswith("adapter/") else None
            data, digest, size = _read_member(zf, info, part.size, out)
            if size != part.size or digest != part.sha256:
                raise PersonaFileError(f"{name} does not match its checksum in the manifest: "
                                       f"the file is damaged or was altered; export it again")
            if data is not None:
                texts[name] = data
    return _parse(manifest, staging, texts)


def _manifest(raw: Any, path: Path) -> Manifest:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise PersonaFileError(f"{path} is not an A4PS persona file (its manifest says "
                               f"format {raw.get('format') if isinstance(raw, dict) else raw!r})")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PersonaFileError(f"{path}: the manifest's format_version is {version!r}")
    if version > FORMAT_VERSION:
        raise PersonaFileError(
            f"{path} was written by a newer A4PS ({raw.get('a4ps_version')}, persona file "
            f"format {version}); this A4PS ({__version__}) reads up to format "
            f"{FORMAT_VERSION}: upgrade A4PS to import it")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PersonaFileError(f"{path}: the manifest is invalid at {where}: {first['msg']}") \
            from None


def _parse(manifest: Manifest, staging: Path, texts: dict[str, bytes]) -> PersonaArchive:
    proto = _json(texts["proto.json"], "proto.json")
    if not isinstance(proto, dict) or not isinstance(proto.get("slots"), dict) \
            or not isinstance(proto.get("methods"), dict):
        raise PersonaFileError("proto.json must hold slots and methods")
    for name, source in {**proto["methods"],
                         **((proto.get("inherited") or {}).get("methods") or {})}.items():
        if not isinstance(source, str):
            raise PersonaFileError(f"proto.json: method {name!r} has no source text")
        try:
            compile_method(name, source)
        except ProtoError as e:
            raise PersonaFileError(f"proto.json: {e}") from None
    for key in proto["slots"]:
        try:
            Proto._check_slot_name(key)
        except ProtoError as e:
            raise PersonaFileError(f"proto.json: {e}") from None
    codex = _json(texts["codex.json"], "codex.json")
    entry = codex.get("persona") if isinstance(codex, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("principles"), dict) \
            or not isinstance(entry.get("role"), str):
        raise PersonaFileError("codex.json must hold the persona's role and principles")
    rows = _jsonl(texts["memories.jsonl"], "memories.jsonl")
    for i, row in enumerate(rows, 1):
        _check_row(row, i)
    try:
        vectors = np.load(io.BytesIO(texts["vectors.npy"]), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PersonaFileError(f"vectors.npy is not a numpy array file ({e})") from None
    dim = manifest.embedder.dim
    if vectors.dtype != np.float32 or vectors.shape != (len(rows), dim):
        raise PersonaFileError(f"vectors.npy holds {vectors.dtype} {vectors.shape}; the "
                               f"manifest and memories.jsonl say float32 ({len(rows)}, {dim})")
    if not np.all(np.isfinite(vectors)):
        raise PersonaFileError("vectors.npy holds non-finite values")
    golden = _jsonl(texts["golden.jsonl"], "golden.jsonl") if "golden.jsonl" in texts else []
    if manifest.adapter is not None:
        names = {f"adapter/{f}" for f in manifest.adapter.files}
        if names != {n for n in manifest.parts if n.startswith("adapter/")}:
            raise PersonaFileError("the manifest's adapter files and its parts disagree")
        if "adapter/adapter_config.json" not in names:
            raise PersonaFileError("the adapter has no adapter_config.json")
        if not any(n.endswith((".safetensors", ".bin")) for n in names):
            raise PersonaFileError("the adapter has no weights file")
        _json((staging / "adapter" / "adapter_config.json").read_bytes(),
              "adapter/adapter_config.json")
    return PersonaArchive(manifest, staging, proto, codex, rows, vectors, golden)


# -- the part the System builds --------------------------------------------------------------------

Progress = Callable[[str, int, int], None]


class PersonaFiles:
    """Export and import personas for one System (its parts are passed in)."""

    def __init__(self, settings: Settings, protos: ProtoManager, codex: Codex,
                 memory: MemoryManager, models: ModelManager, embedder: Embedder,
                 bus: EventBus, *,
                 save: Callable[..., Any] | None = None,
                 limits: ImportLimits = ImportLimits()) -> None:
        self.settings = settings
        self.protos = protos
        self.codex = codex
        self.memory = memory
        self.models = models
        self.embedder = embedder
        self.bus = bus
        self.save = save
        self.limits = limits

    # -- export ------------------------------------------------------------------------
    def persona_name(self, name: str) -> str:
        for candidate in (name, name.upper()):
            if candidate in self.codex.personas and candidate in self.protos:
                return candidate
        known = sorted(n for n in self.codex.personas if n in self.protos)
        raise PersonaFileError(f"no persona {name!r}; personas here: {', '.join(known)}")

    def export(self, name: str, path: Path | str, *, golden: bool = False,
               overwrite: bool = False) -> dict[str, Any]:
        """Write persona ``name`` to ``path``; returns what went in."""
        t0 = time.perf_counter()
        name = self.persona_name(name)
        path = Path(path).expanduser().resolve()
        if path.is_dir():
            raise PersonaFileError(f"{path} is a folder; give a file name (e.g. {name.lower()}"
                                   f"{SUFFIX})")
        if path.exists() and not overwrite:
            raise PersonaFileError(f"{path} exists; choose another file or pass --force")
        if not path.parent.is_dir():
            raise PersonaFileError(f"folder {path.parent} does not exist")
        proto = self.protos.get(name)
        proto_doc = self._proto_doc(proto)
        backend = str(proto.get("model_backend") or self.settings.models.backend)
        model_name = str(proto.get("model_name") or "")
        lineage = proto.get("model_lineage") or []
        adapter = self._live_adapter(model_name, lineage, backend)
        base = self._base_model(model_name, lineage, backend)
        rows, vectors = self._memories(name)
        golden_rows = self._golden(name) if golden else []
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        try:
            with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
                w = _ZipWriter(zf)
                w.put_bytes("proto.json", json.dumps(proto_doc, ensure_ascii=False,
                                                     indent=1).encode())
                w.put_bytes("codex.json", json.dumps(self._codex_doc(name), ensure_ascii=False,
                                                     indent=1).encode())
                w.put_bytes("memories.jsonl", "".join(
                    json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
                buf = io.BytesIO()
                np.save(buf, vectors, allow_pickle=False)
                w.put_bytes("vectors.npy", buf.getvalue(), compress=False)
                files: list[str] = []
                if adapter is not None:
                    for f in sorted(adapter.iterdir()):
                        if f.is_file() and _ADAPTER_MEMBER.match(f"adapter/{f.name}"):
                            w.put_file(f"adapter/{f.name}", f,
                                       compress=not f.name.endswith((".safetensors", ".bin")))
                            files.append(f.name)
                if golden:
                    w.put_bytes("golden.jsonl", "".join(
                        json.dumps(r, ensure_ascii=False) + "\n" for r in golden_rows).encode())
                live = next((e for e in reversed(lineage) if isinstance(e, dict)
                             and e.get("status") == "live"), None)
                manifest = {
                    "format": FORMAT, "format_version": FORMAT_VERSION,
                    "a4ps_version": __version__, "created_at": time.time(), "persona": name,
                    "embedder": {"id": embedder_id(self.embedder), "dim": int(self.embedder.dim)},
                    "base_model": base, "model_name": model_name,
                    "adapter": ({"version": (live or {}).get("version"), "files": files}
                                if adapter is not None else None),
                    "counts": {"memories": len(rows), "golden": len(golden_rows)},
                    "parts": w.parts,
                }
                zf.writestr(MANIFEST, json.dumps(manifest, indent=1))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        report = {"persona": name, "path": str(path), "bytes": path.stat().st_size,
                  "memories": len(rows), "adapter": adapter is not None,
                  "golden": len(golden_rows), "seconds": round(time.perf_counter() - t0, 3)}
        log.info("exported persona %s to %s (%d bytes)", name, path, report["bytes"])
        return report

    def _proto_doc(self, proto: Proto) -> dict[str, Any]:
        slots = {k: _json_value(v, f"slot {proto.name}.{k}") for k, v in proto.own_slots().items()}
        inherited_slots: dict[str, Any] = {}
        inherited_methods: dict[str, str] = {}
        p = proto.parent
        while p is not None:
            for k, v in p.own_slots().items():
                if k not in slots and k not in inherited_slots:
                    inherited_slots[k] = _json_value(v, f"slot {p.name}.{k}")
            for k, src in p.own_methods().items():
                if k not in proto.own_methods() and k not in inherited_methods:
                    inherited_methods[k] = src
            p = p.parent
        return {"name": proto.name, "parent": proto.parent.name if proto.parent else None,
                "slots": slots, "methods": proto.own_methods(),
                "inherited": {"slots": inherited_slots, "methods": inherited_methods}}

    def _codex_doc(self, name: str) -> dict[str, Any]:
        state = self.codex.image_state()
        history = []
        for h in state["history"]:
            if h.get("persona") == name:
                history.append(h)
        return {"persona": state["personas"][name], "history": history,
                "codex_version": state["version"]}

    def _live_adapter(self, model_name: str, lineage: list[Any], backend: str) -> Path | None:
        if backend == "ollama":
            live = next((e for e in reversed(lineage) if isinstance(e, dict)
                         and e.get("status") == "live" and e.get("model_name") == model_name),
                        None)
            adir = live.get("adapter_dir") if live else None
        else:
            _, sep, adir = model_name.partition(LORA_TAG)
            adir = adir if sep else None
        if not adir:
            return None
        path = Path(adir)
        if not (path / "adapter_config.json").is_file():
            raise PersonaFileError(f"the live adapter {path} is missing (no adapter_config.json); "
                                   f"roll the persona back (`a4ps models rollback`) or restore it")
        return path

    def _base_model(self, model_name: str, lineage: list[Any], backend: str) -> dict[str, str]:
        if backend == "ollama":
            base = next((e.get("model_name") for e in reversed(lineage) if isinstance(e, dict)
                         and e.get("is_base") and e.get("status") in ("live", "superseded")),
                        None)
            return {"id": str(base or model_name), "backend": backend}
        return {"id": model_name.partition(LORA_TAG)[0], "backend": backend}

    def _memories(self, name: str) -> tuple[list[dict[str, Any]], np.ndarray]:
        dim = int(self.embedder.dim)
        tbl = (self.memory.table.search().where(f"persona = {_quote(name)}")
               .select(_MEMORY_COLUMNS + ["vector"]).limit(None).to_arrow())
        if tbl.num_rows == 0:
            return [], np.zeros((0, dim), dtype=np.float32)
        vecs = np.asarray(tbl["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                          dtype=np.float32).reshape(tbl.num_rows, -1)
        rows = tbl.drop_columns(["vector"]).to_pylist()
        for r in rows:
            try:
                r["meta"] = json.loads(r.get("meta") or "{}")
            except ValueError:
                r["meta"] = {"raw": r.get("meta")}
        order = sorted(range(len(rows)), key=lambda i: (rows[i].get("ts") or 0, rows[i]["id"]))
        return [rows[i] for i in order], np.ascontiguousarray(vecs[order])

    def _golden(self, name: str) -> list[dict[str, Any]]:
        """Golden-set rows ALFRED's vote gave this persona, and the archived sets its
        fine-tunes were trained on."""
        gdir = Path(self.settings.golden_dir)
        out: list[dict[str, Any]] = []
        current = gdir / "golden.jsonl"
        if current.is_file():
            out += [r for r in _jsonl(current.read_bytes(), str(current))
                    if (r.get("meta") or {}).get("critical_persona") == name]
        archive = gdir / "archive"
        pattern = re.compile(rf"^golden-.+-{re.escape(name)}(-\d+)?\.jsonl$")
        if archive.is_dir():
            for f in sorted(archive.iterdir()):
                if pattern.match(f.name):
                    out += _jsonl(f.read_bytes(), str(f))
        return out

    # -- import ------------------------------------------------------------------------
    def import_(self, path: Path | str, *, as_name: str | None = None,
                progress: Progress | None = None) -> dict[str, Any]:
        """Check ``path`` completely, then install it as ``as_name`` (default: its own
        name), all or nothing. Returns what was installed."""
        t0 = time.perf_counter()
        path = Path(path).expanduser().resolve()
        staging = self.settings.data_dir / f".persona-import-{uuid.uuid4().hex[:12]}"
        try:
            archive = read_persona_file(path, staging, self.limits)
            plan = self._plan(archive, as_name)
            report = self._install(archive, plan, path, progress)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        self.bus.publish("persona.imported", {k: report[k] for k in (
            "persona", "from_persona", "path", "memories", "reembedded", "adapter", "golden")})
        return report

    def _plan(self, archive: PersonaArchive, as_name: str | None) -> dict[str, Any]:
        m = archive.manifest
        name = (as_name or m.persona).strip()
        if not _NAME.match(name):
            raise PersonaFileError(f"persona name {name!r} must be 1-64 letters, digits, '_' "
                                   f"or '-', starting with a letter")
        if name in self.protos or name in self.codex.personas:
            raise PersonaFileError(f"a persona or proto named {name!r} exists here; import it "
                                   f"under another name with --as NEWNAME")
        parent = archive.proto.get("parent")
        if parent and parent not in self.protos:
            raise PersonaFileError(f"the persona delegates to a proto {parent!r} that this "
                                   f"image does not have")
        here = self.settings.models.backend
        backend = m.base_model.backend
        adapter = m.adapter is not None
        if adapter and backend != here:
            raise PersonaFileError(
                f"{m.persona}'s live LoRA adapter runs on the {backend} backend over "
                f"{m.base_model.id}; this system runs models.backend = {here}: switch the "
                f"backend (A4PS_MODELS__BACKEND={backend}) to import it")
        if backend == here:
            self._check_base_present(m.base_model.id, backend)
        same_embedder = (m.embedder.id == embedder_id(self.embedder)
                         and m.embedder.dim == int(self.embedder.dim))
        return {"name": name, "backend": here, "keep_model": backend == here,
                "reembed": not same_embedder}

    def _check_base_present(self, base: str, backend: str) -> None:
        try:
            self.models.backend.estimate_bytes(base)
            if backend == "embedded":
                if not (checkpoint_dir(self.settings) / ".a4ps-complete").exists():
                    gguf_path(self.settings)      # raises ModelNotFound with the pip command
        except ModelError as e:
            raise PersonaFileError(f"the persona's base model {base!r} is not present on this "
                                   f"system: {e}") from None

    def _install(self, archive: PersonaArchive, plan: dict[str, Any], path: Path,
                 progress: Progress | None) -> dict[str, Any]:
        m, name = archive.manifest, plan["name"]
        undo: list[Callable[[], None]] = []
        try:
            model_name, lineage = self._install_adapter(archive, plan, undo)
            vectors = self._vectors(archive, plan, progress)
            ids = self._install_memories(archive, name, vectors, undo)
            golden_path = self._install_golden(archive, name, undo)
            codex_before = self.codex.image_state()
            pc = archive.codex["persona"]
            try:
                self.codex.add_persona(
                    name, PersonaCodex(role=pc["role"], description=pc.get("description", ""),
                                       principles=dict(pc["principles"])),
                    by="user", reason=f"imported persona {m.persona} from {path.name}",
                    imported=archive.codex.get("history") or [])
            except CodexError as e:
                raise PersonaFileError(f"the codex refused the persona: {e}") from None
            undo.append(lambda: self.codex.restore_image(codex_before))
            self._create_proto(archive, name, plan, model_name, lineage)
            undo.append(lambda: self.protos.remove(name))
            if self.save is not None:
                self.save(trigger="manual", note=f"imported persona {name}")
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except Exception:
                    log.exception("undoing part of a failed persona import")
            raise
        log.info("imported persona %s as %s from %s", m.persona, name, path)
        return {"persona": name, "from_persona": m.persona, "path": str(path),
                "memories": len(ids), "reembedded": plan["reembed"],
                "adapter": model_name if m.adapter is not None else None,
                "golden": str(golden_path) if golden_path else None,
                "model_name": self.protos.get(name).get("model_name"),
                "a4ps_version": m.a4ps_version}

    def _install_adapter(self, archive: PersonaArchive, plan: dict[str, Any],
                         undo: list[Callable[[], None]]) -> tuple[str | None, list[Any]]:
        m = archive.manifest
        lineage = [dict(e) for e in (archive.proto["slots"].get("model_lineage") or [])
                   if isinstance(e, dict)]
        if m.adapter is None:
            return None, lineage
        version = m.adapter.version or 1
        root = Path(self.settings.adapter_dir).resolve() / plan["name"]
        while (root / f"v{version}").exists():
            version += 1
        vdir = root / f"v{version}"
        _make_dirs(root, undo)
        vdir.mkdir()
        undo.append(lambda: shutil.rmtree(vdir, ignore_errors=True))
        target = vdir / "adapter"
        assert archive.adapter_dir is not None, "a manifest with an adapter has its files"
        os.replace(archive.adapter_dir, target)
        (vdir / "IMPORTED").write_text(f"persona {m.persona} from a persona file, "
                                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        if plan["backend"] == "embedded":
            cfg_path = target / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str(checkpoint_dir(self.settings))
            cfg_path.write_text(json.dumps(cfg, indent=2))
        if plan["backend"] == "ollama":
            tag = f"a4ps-{plan['name'].lower()}:v{version}"
            backend = self.models.backend
            try:
                if not isinstance(backend, AdapterHost):
                    raise ModelError(f"the {backend.name} backend cannot register adapters")
                model_name = backend.create_with_adapter(tag, m.base_model.id, target)
            except Exception as e:   # the model's error, not ours: refuse with its message
                raise PersonaFileError(f"Ollama could not create {tag} over "
                                       f"{m.base_model.id}: {e}") from None
        else:
            model_name = f"{m.base_model.id}{LORA_TAG}{target}"
        for entry in lineage:
            if entry.get("status") == "live" and entry.get("model_name") == m.model_name:
                entry.update(imported_from={"persona": m.persona,
                                            "model_name": entry.get("model_name"),
                                            "adapter_dir": entry.get("adapter_dir")},
                             model_name=model_name, adapter_dir=str(target), version=version)
        return model_name, lineage

    def _vectors(self, archive: PersonaArchive, plan: dict[str, Any],
                 progress: Progress | None) -> np.ndarray:
        if not plan["reembed"]:
            return archive.vectors
        texts = [r["text"] for r in archive.rows]
        out = np.zeros((len(texts), int(self.embedder.dim)), dtype=np.float32)
        batch = 256
        for i in range(0, len(texts), batch):
            out[i:i + batch] = np.asarray(self.embedder.embed(texts[i:i + batch]),
                                          dtype=np.float32)
            done = min(len(texts), i + batch)
            self.bus.publish("persona.progress", {"stage": "embedding", "done": done,
                                                  "total": len(texts)})
            if progress is not None:
                progress("re-embedding memories", done, len(texts))
        return out

    def _install_memories(self, archive: PersonaArchive, name: str, vectors: np.ndarray,
                          undo: list[Callable[[], None]]) -> list[str]:
        if not archive.rows:
            return []
        old = archive.manifest.persona
        entries = [{"text": r["text"], "kind": r["kind"], "persona": name,
                    "task_id": r.get("task_id") or "", "ts": r.get("ts"),
                    "dissonance": r.get("dissonance") or 0.0, "curated": bool(r.get("curated")),
                    "meta": {**_map(r.get("meta")),
                             "imported_from": {"persona": old, "id": r.get("id")}}}
                   for r in archive.rows]
        ids = self.memory.add_many(entries, vectors=vectors)

        def forget() -> None:
            self.memory.delete(ids)
        undo.append(forget)
        return ids

    def _install_golden(self, archive: PersonaArchive, name: str,
                        undo: list[Callable[[], None]]) -> Path | None:
        if not archive.golden:
            return None
        adir = Path(self.settings.golden_dir) / "archive"
        _make_dirs(adir, undo)
        target = adir / f"golden-imported-{time.strftime('%Y%m%d-%H%M%S')}-{name}.jsonl"
        n = 1
        while target.exists():
            target = target.with_name(f"{target.stem}-{n}.jsonl")
            n += 1
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                  for r in archive.golden), encoding="utf-8")
        undo.append(lambda: target.unlink(missing_ok=True))
        return target

    def _create_proto(self, archive: PersonaArchive, name: str, plan: dict[str, Any],
                      model_name: str | None, lineage: list[Any]) -> None:
        doc = archive.proto
        parent_name = doc.get("parent")
        parent = self.protos.get(parent_name) if parent_name else None
        slots = dict(doc["slots"])
        methods = dict(doc["methods"])
        inherited = doc.get("inherited") or {}
        # what the persona inherited in its old image and would inherit differently here
        # becomes its own, so it behaves the same
        for k, v in (inherited.get("slots") or {}).items():
            if parent is None or not parent.has(k) or parent.get(k) != v:
                slots.setdefault(k, v)
        for k, src in (inherited.get("methods") or {}).items():
            here = None
            p = parent
            while p is not None and here is None:
                here = p.own_methods().get(k)
                p = p.parent
            if here != src:
                methods.setdefault(k, src)
        if plan["keep_model"]:
            if model_name is not None:
                slots["model_name"] = model_name
        else:   # the model it used does not exist on this backend: follow the settings
            slots["model_name"] = self.settings.models.persona_model("ALFRED")
            slots["model_backend"] = plan["backend"]
        slots["model_lineage"] = lineage
        slots["system_prompt"] = self.codex.system_prompt(name)
        slots["status"] = "idle"
        try:
            self.protos.create(name, slots, parent=parent_name, methods=methods)
        except ProtoError as e:
            raise PersonaFileError(f"the persona could not be created: {e}") from None


def _map(value: Any) -> dict[str, Any]:
    """``value`` when it is a map, else an empty one (a file from an older version)."""
    return value if isinstance(value, dict) else {}
