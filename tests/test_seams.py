"""Each seam's Protocol (in the module that owns it) is met by the parts built for it.

mypy checks the same statically (tests/test_types.py); this is the run-time view, with
the real parts, so a renamed method breaks a test even where the types are relaxed.
"""
from __future__ import annotations

from pathlib import Path

from a4ps.config import load_settings
from a4ps.events import Bus, EventBus
from a4ps.memory import MemoryManager, MemoryStore
from a4ps.models.base import ChatBackend
from a4ps.models.embeddings import Embedder, HashEmbedder
from a4ps.models.manager import ModelManager
from a4ps.models.scripted import demo_backend
from a4ps.proto import ProtoManager
from a4ps.task_queues import open_task_queue
from a4ps.tasks import TaskQueue
from a4ps.tools.registry import ToolLookup, ToolRegistry
from a4ps.tools.sandbox import SandboxRunner, make_sandbox
from a4ps.tools.tool_forge import Forger, ToolForge


def test_the_real_parts_meet_their_seams(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    bus = EventBus()
    embedder = HashEmbedder()
    sandbox = make_sandbox(settings)
    protos = ProtoManager(bus)
    registry = ToolRegistry(protos, settings, bus, embedder=embedder, sandbox=sandbox)
    forge = ToolForge(registry, sandbox, lambda spec, feedback: "", settings, bus)
    memory = MemoryManager(settings, embedder, bus=bus)
    queue = open_task_queue(settings, bus=bus)
    models = ModelManager(settings, bus, backend=demo_backend(), embedder=embedder)
    try:
        assert isinstance(bus, Bus)
        assert isinstance(embedder, Embedder) and isinstance(models, Embedder)
        assert isinstance(sandbox, SandboxRunner)
        assert isinstance(registry, ToolLookup)
        assert isinstance(forge, Forger)
        assert isinstance(memory, MemoryStore)
        assert isinstance(queue, TaskQueue)
        assert isinstance(demo_backend(), ChatBackend)
    finally:
        queue.close()
        memory.close()
        sandbox.close()
