"""Appends memories to the memory the settings name, for the object-storage tests.

    python tests/memory_worker.py DATA_DIR WHO N

Settings come from the environment (A4PS_MEMORY__URI, A4PS_MEMORY__STORAGE_OPTIONS), as
a daemon's would. Adds ``N`` rows one at a time, texts ``WHO-i``, with the hash embedder;
prints ``done`` when all are committed, with how many writes it had to run again
because other writers kept winning the commit.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from a4ps.config import load_settings  # noqa: E402
from a4ps.memory import MemoryManager  # noqa: E402
from a4ps.models.embeddings import HashEmbedder  # noqa: E402


def main() -> int:
    data_dir, who, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    settings = load_settings(data_dir=data_dir)
    mem = MemoryManager(settings, HashEmbedder(dim=384), auto_maintain=False)
    for i in range(n):
        mem.add(f"{who}-{i} remembers apples number {i}", kind="note", persona=who,
                task_id=f"{who}-task-{i}", meta={"i": i, "who": who})
    mem.close()
    print(f"done commit_retries={mem.commit_retries}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
