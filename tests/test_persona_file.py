"""Personas as portable files: export, import (as is, under another name, with another
embedder), every listed bad input refused with nothing written, through the daemon and
the CLI, and — slow, on the real SmolLM2 + MiniLM — the same greedy answer and the same
memories after a round trip.

The fast tests use a real System (ProtoManager, Codex, LanceDB on disk, image files) on
the scripted stand-in chat backend and the hash stand-in embedder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from a4ps.config import load_settings
from a4ps.events import EventRecorder
from a4ps.models.embeddings import HashEmbedder
from a4ps.persona_file import FORMAT_VERSION, ImportLimits, PersonaFileError
from a4ps.system import System
from ports import free_addr

GREET = "def greet(self):\n    return 'hello, I am ' + self.role"
RULE = "Count the assumptions before answering."


def make_settings(data_dir, backend="scripted"):
    return load_settings(data_dir=data_dir, models={"backend": backend,
                                                    "embedding_backend": "hash"})


def fake_adapter(d: Path) -> Path:
    """Adapter files in the PEFT layout (the fast tests' model is the scripted stand-in)."""
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA",
                                                       "base_model_name_or_path": "/elsewhere"}))
    (d / "adapter_model.safetensors").write_bytes(np.random.default_rng(1).bytes(40_000))
    return d


def memory_texts(n: int) -> list[str]:
    topics = ["rivers", "bridges", "prime numbers", "tea", "chess openings", "glaciers",
              "violins", "volcanoes", "sourdough", "satellites"]
    return [f"Note {i}: BRICK worked out a fact about {topics[i % len(topics)]} number {i}."
            for i in range(n)]


@pytest.fixture
def source(tmp_path):
    """A system whose BRICK has an edited method, an amended principle, a live adapter,
    memories and golden data."""
    s = source_system(tmp_path / "a")
    yield s
    s.stop()


def source_system(data_dir: Path) -> System:
    """The :func:`source` fixture's system, started (the caller stops it)."""
    s = System(make_settings(data_dir)).start(services=False)
    s.protos.update("persona", methods={"greet": GREET})       # BRICK inherits this
    s.protos.update("BRICK", {"temperature": 0.15, "catchphrase": "by the numbers"},
                    methods={"square": "def square(self, x):\n    return x * x"})
    a = s.codex.propose("BRICK", "rigor", RULE, "asked")
    s.codex.decide(a.id, s.codex.version, True, by="user")
    adapter = fake_adapter(s.settings.adapter_dir / "BRICK" / "v2" / "adapter")
    lineage = [{"version": 0, "model_name": "smollm2-135m", "status": "superseded",
                "is_base": True, "backend": "scripted", "adapter_dir": None},
               {"version": 2, "model_name": f"smollm2-135m+lora:{adapter}", "status": "live",
                "backend": "scripted", "adapter_dir": str(adapter)}]
    s.protos.update("BRICK", {"model_name": lineage[1]["model_name"], "model_lineage": lineage})
    s.memory.add_many([{"text": t, "kind": "note", "persona": "BRICK", "task_id": f"t{i}"}
                       for i, t in enumerate(memory_texts(40))])
    s.memory.add_many([{"text": "ROBIN's own memory of kindness", "kind": "note",
                        "persona": "ROBIN"}])
    gdir = s.settings.golden_dir
    gdir.mkdir(parents=True, exist_ok=True)
    (gdir / "golden.jsonl").write_text("".join(json.dumps(
        {"messages": [{"role": "user", "content": f"q{i}"}],
         "meta": {"critical_persona": "BRICK" if i % 2 else "ROBIN"}}) + "\n" for i in range(6)))
    return s


@pytest.fixture
def target(tmp_path):
    s = System(make_settings(tmp_path / "b")).start(services=False)
    yield s
    s.stop()


def searched(system, query, persona, k=40):
    """The ranking of a persona's memories for ``query`` (ties in text order)."""
    hits = system.memory.search(query, k=k, filters=f"persona = '{persona}'")
    return sorted(((round(h.score, 5), h.text) for h in hits), key=lambda st: (-st[0], st[1]))


def test_export_then_import_under_a_new_name_is_the_same_persona(source, target, tmp_path):
    f = tmp_path / "brick.a4persona"
    out = source.personas.export("brick", f, golden=True)
    assert out["memories"] == 40 and out["adapter"] and out["golden"] == 3
    with zipfile.ZipFile(f) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        for name, part in manifest["parts"].items():
            assert hashlib.sha256(zf.read(name)).hexdigest() == part["sha256"]
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["embedder"] == {"id": "hash-stand-in-384", "dim": 384}
    assert manifest["base_model"] == {"id": "smollm2-135m", "backend": "scripted"}

    rec = EventRecorder(target.bus)
    report = target.personas.import_(f, as_name="BRICK2")
    assert report["persona"] == "BRICK2" and report["memories"] == 40 and not report["reembedded"]
    src, new = source.protos.get("BRICK"), target.protos.get("BRICK2")
    # slots and behaviour, including the method it inherited from an edited parent
    assert new.temperature == 0.15 and new.catchphrase == "by the numbers"
    assert new.square(7) == 49 and new.greet() == src.greet() == "hello, I am logician"
    assert "greet" in new.own_methods()           # this image's persona has no greet
    assert new.system_prompt == src.system_prompt
    # codex principles and their history
    assert target.codex.persona("BRICK2").principles == source.codex.persona("BRICK").principles
    added = target.codex.history[-1]
    assert added.persona == "BRICK2" and [h["new_text"] for h in added.imported] == [RULE]
    # the adapter, copied and re-pointed, and its lineage
    adir = Path(new.model_name.partition("+lora:")[2])
    assert adir.parent.parent == target.settings.adapter_dir.resolve() / "BRICK2"
    src_dir = Path(src.model_name.partition("+lora:")[2])
    assert (adir / "adapter_model.safetensors").read_bytes() == \
        (src_dir / "adapter_model.safetensors").read_bytes()
    live = [e for e in new.model_lineage if e["status"] == "live"]
    assert live[0]["adapter_dir"] == str(adir) and live[0]["imported_from"]["persona"] == "BRICK"
    # the same memories, found the same way
    for q in ("glaciers", "a fact about tea", "chess openings number 4"):
        assert searched(target, q, "BRICK2") == searched(source, q, "BRICK")
    assert target.memory.count() == 40                 # ROBIN's memory stayed behind
    # golden data, out of the active set
    golden = list((target.settings.golden_dir / "archive").glob("golden-imported-*-BRICK2.jsonl"))
    assert len(golden) == 1 and len(golden[0].read_text().splitlines()) == 3
    assert rec.of("persona.imported")[0].payload["persona"] == "BRICK2"
    assert new.invoke_llm("hello")        # it talks (scripted stand-in, through its adapter id)
    # the import was saved: a restart still has it
    target.stop()
    with System(target.settings).start(services=False) as again:
        assert again.protos.get("BRICK2").square(3) == 9
        assert "BRICK2" in again.codex.personas


def test_a_taken_name_is_refused_and_nothing_is_written(source, target, tmp_path):
    f = tmp_path / "brick.a4persona"
    source.personas.export("BRICK", f)
    before = state_of(target)
    with pytest.raises(PersonaFileError, match="--as NEWNAME"):
        target.personas.import_(f)
    assert state_of(target) == before


def test_import_re_embeds_when_the_embedder_differs(source, tmp_path):
    f = tmp_path / "brick.a4persona"
    source.personas.export("BRICK", f)
    other = System(make_settings(tmp_path / "c"), embedder=HashEmbedder(dim=96)).start(
        services=False)
    try:
        shown = []
        report = other.personas.import_(f, as_name="BRICK9", progress=lambda *a: shown.append(a))
        assert report["reembedded"] and shown[-1] == ("re-embedding memories", 40, 40)
        assert other.memory.count() == 40
        text = memory_texts(40)[7]
        hits = other.memory.search(text, k=3, filters="persona = 'BRICK9'")
        assert hits[0].text == text and hits[0].score == pytest.approx(1.0)
    finally:
        other.stop()


def test_exporting_what_is_not_a_persona_is_refused(source, tmp_path):
    with pytest.raises(PersonaFileError, match="no persona 'persona'"):
        source.personas.export("persona", tmp_path / "x.a4persona")
    source.protos.update("BRICK", {"weird": {1, 2}})
    with pytest.raises(PersonaFileError, match="weird holds a set"):
        source.personas.export("BRICK", tmp_path / "x.a4persona")
    assert not (tmp_path / "x.a4persona").exists()
    assert not list(tmp_path.glob(".x.a4persona.tmp*"))


# -- bad input: each refused, nothing written -------------------------------------------------

def state_of(system) -> dict:
    data = system.settings.data_dir
    return {
        "protos": sorted(system.protos.names()),
        "codex": (system.codex.version, sorted(system.codex.personas)),
        "memories": system.memory.count(),
        "files": sorted(str(p.relative_to(data)) for p in data.rglob("*")
                        if "memory_db" not in p.parts and "checkpoints" not in p.parts),
    }


def members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write_zip(path: Path, members: dict[str, bytes], *, fix_manifest: bool = True,
              infos: dict[str, zipfile.ZipInfo] | None = None) -> Path:
    members = dict(members)
    if fix_manifest:
        manifest = json.loads(members["manifest.json"])
        manifest["parts"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                             for n, b in members.items() if n != "manifest.json"}
        members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr((infos or {}).get(name) or name, data)
    return path


@pytest.fixture
def good(source, tmp_path):
    f = tmp_path / "good.a4persona"
    source.personas.export("BRICK", f, golden=True)
    return f


def _truncated(good, d):
    data = good.read_bytes()
    return (d / "t.a4persona").write_bytes(data[: len(data) * 2 // 3]) and d / "t.a4persona"


def _bad_checksum(good, d):
    m = members_of(good)
    m["memories.jsonl"] = m["memories.jsonl"].replace(b"glaciers", b"GLACIERS")
    return write_zip(d / "c.a4persona", m, fix_manifest=False)


def _future(good, d):
    m = members_of(good)
    manifest = json.loads(m["manifest.json"])
    manifest.update(format_version=FORMAT_VERSION + 1, a4ps_version="9.0", hologram={"x": 1})
    m["manifest.json"] = json.dumps(manifest).encode()
    return write_zip(d / "f.a4persona", m, fix_manifest=False)


def _traversal(name):
    def build(good, d):
        m = members_of(good)
        m[name] = b"print('owned')\n"
        return write_zip(d / "p.a4persona", m)
    return build


def _symlink(good, d):
    m = members_of(good)
    info = zipfile.ZipInfo("adapter/link.safetensors")
    info.external_attr = (0o120777 << 16)
    m["adapter/link.safetensors"] = b"/etc/passwd"
    return write_zip(d / "s.a4persona", m, infos={"adapter/link.safetensors": info})


def _ten_gigabytes(good, d):
    """A member whose header says 10 GB (forged, so nothing big is ever written)."""
    path = d / "bomb.a4persona"
    m = members_of(good)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in m.items():
            zf.writestr(name, data)
        zf.getinfo("memories.jsonl").file_size = 10 * 2**30   # the central directory lies
    assert path.stat().st_size < 1_000_000
    return path


def _inflates_past_its_size(good, d):
    """A compressible stream (64 MB of zeros, 64 KB on disk) declared as a few bytes."""
    path = d / "lie.a4persona"
    m = members_of(good)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in m.items():
            if name == "golden.jsonl":
                with zf.open("golden.jsonl", "w") as out:
                    zero = bytes(1 << 20)
                    for _ in range(64):
                        out.write(zero)
            else:
                zf.writestr(name, data)
        zf.getinfo("golden.jsonl").file_size = len(m["golden.jsonl"])
    return path


def _unlisted(good, d):
    m = members_of(good)
    m["adapter/extra.bin"] = b"\0" * 10
    return write_zip(d / "u.a4persona", m, fix_manifest=False)


def _missing_part(good, d):
    m = members_of(good)
    del m["vectors.npy"]
    return write_zip(d / "m.a4persona", m, fix_manifest=False)


def _not_a_zip(good, d):
    p = d / "n.a4persona"
    p.write_bytes(b"PK\x03\x04 certainly not a zip" * 100)
    return p


def _wrong_vectors(good, d):
    m = members_of(good)
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 384), dtype=np.float32))
    m["vectors.npy"] = buf.getvalue()
    return write_zip(d / "v.a4persona", m)


def _bad_row(good, d):
    m = members_of(good)
    lines = m["memories.jsonl"].decode().splitlines()
    row = json.loads(lines[3])
    row["ts"] = "yesterday"
    lines[3] = json.dumps(row)
    m["memories.jsonl"] = ("\n".join(lines) + "\n").encode()
    return write_zip(d / "r.a4persona", m)


def _bad_method(good, d):
    m = members_of(good)
    proto = json.loads(m["proto.json"])
    proto["methods"]["square"] = "def square(self, x):\n    return (x *"
    m["proto.json"] = json.dumps(proto).encode()
    return write_zip(d / "bm.a4persona", m)


def _other_backend(good, d):
    m = members_of(good)
    manifest = json.loads(m["manifest.json"])
    manifest["base_model"]["backend"] = "embedded"
    m["manifest.json"] = json.dumps(manifest).encode()
    return write_zip(d / "ob.a4persona", m)


BAD = {
    "truncated": (_truncated, "truncated or damaged"),
    "wrong checksum": (_bad_checksum, "does not match its checksum"),
    "manifest from the future": (_future, "newer A4PS .* upgrade A4PS"),
    "traversal ..": (_traversal("../../evil.py"), "path traversal"),
    "traversal absolute": (_traversal("/tmp/evil.py"), "path traversal"),
    "traversal in adapter": (_traversal("adapter/../../../evil.py"), "path traversal"),
    "traversal backslash": (_traversal("adapter\\..\\evil.py"), "path traversal"),
    "symlink": (_symlink, "symbolic link"),
    "10 GB member": (_ten_gigabytes, "declares 10,737,418,240 bytes"),
    "inflates past its size": (_inflates_past_its_size, "damaged|checksum|altered"),
    "member not in the manifest": (_unlisted, "does not list"),
    "part missing": (_missing_part, "incomplete"),
    "not a zip": (_not_a_zip, "not a persona file"),
    "vectors of the wrong shape": (_wrong_vectors, "vectors.npy holds"),
    "memory row with a wrong type": (_bad_row, "row 4: ts must be a number"),
    "method that does not compile": (_bad_method, "syntax error"),
    "adapter for another backend": (_other_backend, "switch the backend"),
}


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    """One good persona file for the bad-input cases, which only read it (each of the
    17 used to build and export its own source system)."""
    d = tmp_path_factory.mktemp("good-source")
    s = source_system(d / "a")
    try:
        f = d / "good.a4persona"
        s.personas.export("BRICK", f, golden=True)
    finally:
        s.stop()
    return f


@pytest.mark.parametrize("case", list(BAD))
def test_bad_persona_files_are_refused_with_nothing_written(case, good_file, target, tmp_path):
    build, message = BAD[case]
    good_bytes = good_file.read_bytes()
    bad = build(good_file, tmp_path)
    assert good_file.read_bytes() == good_bytes             # the shared file is only read
    before = state_of(target)
    with pytest.raises(PersonaFileError, match=message):
        target.personas.import_(bad, as_name="BRICK2")
    assert state_of(target) == before
    assert not list(target.settings.data_dir.glob(".persona-import-*"))
    assert not (tmp_path / "evil.py").exists() and not Path("/tmp/evil.py").exists()


def test_a_member_over_the_configured_limit_is_refused(good, target):
    target.personas.limits = ImportLimits(max_member_bytes=1000)
    with pytest.raises(PersonaFileError, match="declares .* bytes, more than the 1,000"):
        target.personas.import_(good, as_name="X")


def test_the_adapters_base_model_must_be_present(good, tmp_path):
    from a4ps.models.scripted import ScriptedBackend
    only_other = ScriptedBackend(["ok"], models=["some-other-model"])
    s = System(make_settings(tmp_path / "d"), chat_backend=only_other).start(services=False)
    try:
        before = state_of(s)
        with pytest.raises(PersonaFileError, match="base model 'smollm2-135m' is not present"):
            s.personas.import_(good, as_name="B2")
        assert state_of(s) == before
    finally:
        s.stop()


def test_a_failure_part_way_undoes_the_earlier_steps(good, target, monkeypatch):
    before = state_of(target)

    def broken(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(target.protos, "create", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        target.personas.import_(good, as_name="BRICK2")
    assert state_of(target) == before        # memories deleted, adapter and golden removed


# -- CLI and daemon -------------------------------------------------------------------------

def test_cli_export_and_import_without_a_daemon(tmp_path, monkeypatch, capsys):
    from a4ps.cli import main
    monkeypatch.setenv("A4PS_MODELS__BACKEND", "scripted")
    monkeypatch.setenv("A4PS_MODELS__EMBEDDING_BACKEND", "hash")
    a, b = tmp_path / "a", tmp_path / "b"
    with System(load_settings(data_dir=a)).start(services=False) as s:
        s.protos.update("ROBIN", {"favourite": "tea"})
        s.memory.add("ROBIN remembers the smell of rain", kind="note", persona="ROBIN")
    f = tmp_path / "robin.a4persona"
    assert main(["--data-dir", str(a), "persona", "export", "robin", "-o", str(f)]) == 0
    assert "exported ROBIN" in capsys.readouterr().out
    assert main(["--data-dir", str(a), "persona", "export", "ROBIN", "-o", str(f)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["--data-dir", str(b), "persona", "import", str(f)]) == 1
    assert "--as NEWNAME" in capsys.readouterr().err
    assert main(["--data-dir", str(b), "persona", "import", str(f), "--as", "ROBIN2"]) == 0
    assert "imported ROBIN as ROBIN2: 1 memories" in capsys.readouterr().out
    with System(load_settings(data_dir=b)).start(services=False) as s:
        assert s.protos.get("ROBIN2").favourite == "tea"
        assert s.memory.search("rain", k=1)[0].persona == "ROBIN2"


def test_import_goes_through_a_running_daemon(tmp_path, monkeypatch, good, capsys):
    from a4ps.cli import main
    from a4ps.client import DaemonClient, DaemonError
    from a4ps.daemon import Daemon
    for key, value in {"A4PS_MODELS__BACKEND": "scripted",
                       "A4PS_MODELS__EMBEDDING_BACKEND": "hash",
                       "A4PS_BUS__COMMAND_ADDR": free_addr(),
                       "A4PS_BUS__EVENT_ADDR": free_addr()}.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(data_dir=tmp_path / "served")
    system = System(settings)
    daemon = Daemon(system, shutdown_grace_s=5).start()
    try:
        assert main(["--data-dir", str(settings.data_dir), "persona", "import", str(good),
                     "--as", "BRICK3"]) == 0
        assert "imported BRICK as BRICK3: 40 memories" in capsys.readouterr().out
        assert system.protos.get("BRICK3").square(5) == 25     # the daemon's own image
        with DaemonClient.from_settings(settings, timeout=20) as c:
            with pytest.raises(DaemonError) as e:
                c.request("persona.import", {"path": "relative.a4persona"})
            assert e.value.code == "invalid_args" and "absolute" in e.value.message
            with pytest.raises(DaemonError) as e:
                c.request("persona.import", {"path": str(good), "as": "BRICK3"})
            assert e.value.code == "conflict"
            out = c.request("persona.export", {"name": "BRICK3",
                                               "path": str(tmp_path / "again.a4persona")})
            assert out["memories"] == 40
    finally:
        daemon.stop()


# -- the real model ---------------------------------------------------------------------------------

def real_lora(settings, out: Path) -> Path:
    """A real PEFT LoRA adapter on the real base (random, so it changes the answers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from a4ps.models.embedded import ensure_base_checkpoint
    base = ensure_base_checkpoint(settings)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    peft.save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.slow
def test_round_trip_answers_identically_and_finds_the_same_memories(tmp_path, model_cache_dir,
                                                                    minilm):
    from a4ps.models.embedded import EmbeddedBackend, adapter_model_id

    def real_settings(d):
        return load_settings(data_dir=d, models={
            "backend": "embedded", "embedding_backend": "minilm",
            "embedded": {"cache_dir": str(model_cache_dir)}})
    sa, sb = real_settings(tmp_path / "a"), real_settings(tmp_path / "b")
    backend = EmbeddedBackend(sa)            # one resident model for both systems
    embed = minilm                           # the session's MiniLM (the product's)
    a = System(sa, chat_backend=backend, embedder=embed).start(services=False)
    b = System(sb, chat_backend=backend, embedder=embed).start(services=False)
    try:
        adapter = real_lora(sa, sa.adapter_dir / "BRICK" / "v1" / "adapter")
        model = adapter_model_id(adapter)
        a.protos.update("BRICK", {"model_name": model, "model_lineage": [
            {"version": 0, "model_name": "smollm2-135m", "status": "superseded", "is_base": True,
             "backend": "embedded", "adapter_dir": None},
            {"version": 1, "model_name": model, "status": "live", "backend": "embedded",
             "adapter_dir": str(adapter)}]})
        a.memory.add_many([{"text": t, "kind": "note", "persona": "BRICK"}
                           for t in memory_texts(30)])
        prompt = "Name one property of prime numbers."
        ask = {"temperature": 0.0, "max_tokens": 24}
        base_answer = a.models.chat("smollm2-135m", [
            {"role": "system", "content": a.protos.get("BRICK").system_prompt},
            {"role": "user", "content": prompt}], **ask)
        answer = a.protos.get("BRICK").invoke_llm(prompt, **ask)
        assert answer != base_answer            # the adapter matters, so the test means something

        f = tmp_path / "brick.a4persona"
        a.personas.export("BRICK", f)
        b.personas.import_(f, as_name="BRICK2")

        assert b.protos.get("BRICK2").invoke_llm(prompt, **ask) == answer
        new_dir = Path(b.protos.get("BRICK2").model_name.partition("+lora:")[2])
        assert new_dir != adapter and new_dir.is_relative_to(sb.adapter_dir.resolve())
        for q in ("rivers", "something about frozen ice", "music instruments"):
            assert searched(b, q, "BRICK2") == searched(a, q, "BRICK")
    finally:
        a.stop()
        b.stop()


def test_an_ollama_persona_with_an_adapter_moves_between_two_systems(tmp_path):
    """The adapter is re-created in Ollama over the base tag (the tests' Ollama is the
    protocol-level stand-in); without the base tag the import is refused."""
    from ollama_standin import OllamaStandIn
    tags = {"gemma2:2b": 1, "phi3:mini": 1, "llama3.2:3b": 1}

    def ollama_settings(d, url):
        return load_settings(data_dir=d, models={"backend": "ollama", "embedding_backend": "hash",
                                                 "ollama": {"host": url}})
    with OllamaStandIn(models=tags, reply_fn=lambda m, msgs: f"{m} says hi") as srv, \
            OllamaStandIn(models={"gemma2:2b": 1}) as bare:
        a = System(ollama_settings(tmp_path / "a", srv.url)).start(services=False)
        b = System(ollama_settings(tmp_path / "b", srv.url)).start(services=False)
        c = System(ollama_settings(tmp_path / "c", bare.url)).start(services=False)
        try:
            adapter = fake_adapter(a.settings.adapter_dir / "BRICK" / "v1" / "adapter")
            a.protos.update("BRICK", {"model_name": "a4ps-brick:v1", "model_lineage": [
                {"version": 0, "model_name": "phi3:mini", "status": "superseded", "is_base": True,
                 "backend": "ollama", "adapter_dir": None},
                {"version": 1, "model_name": "a4ps-brick:v1", "status": "live",
                 "backend": "ollama", "adapter_dir": str(adapter)}]})
            f = tmp_path / "brick.a4persona"
            a.personas.export("BRICK", f)
            assert json.loads(members_of(f)["manifest.json"])["base_model"] == \
                {"id": "phi3:mini", "backend": "ollama"}

            report = b.personas.import_(f, as_name="BRICK2")
            assert report["model_name"] == "a4ps-brick2:v1"
            create = [body for _, p, body in srv.requests if p == "/api/create"][-1]
            assert create["from"] == "phi3:mini" and create["model"] == "a4ps-brick2:v1"
            assert b.protos.get("BRICK2").invoke_llm("hello") == "a4ps-brick2:v1 says hi"

            before = state_of(c)
            with pytest.raises(PersonaFileError, match="'phi3:mini' is not present.*ollama pull"):
                c.personas.import_(f, as_name="BRICK2")
            assert state_of(c) == before
        finally:
            for s in (a, b, c):
                s.stop()
