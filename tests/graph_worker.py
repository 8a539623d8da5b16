"""Runs one task through the graph on a slow scripted model, for the SIGKILL test.

    python tests/graph_worker.py DATA_DIR TASK_ID [--resume]

Every model call is appended (and fsynced) to DATA_DIR/calls.log as
``<pid> <persona>`` before the reply, so the test can kill us mid-task and count what
the resumed run had to redo. BRICK and ROBIN never agree, so the task runs all rounds.
The result is written to DATA_DIR/result-<pid>.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from a4ps.config import load_settings  # noqa: E402
from a4ps.events import EventBus  # noqa: E402

import graph_parts  # noqa: E402


def main() -> int:
    data_dir, task_id = Path(sys.argv[1]), sys.argv[2]
    resume = "--resume" in sys.argv
    log_path = data_dir / "calls.log"
    pid = os.getpid()
    inner = graph_parts.script(
        brick=lambda n: f"[{pid}] logic step {n}: count the apples precisely",
        robin=lambda n: f"[{pid}] feeling {'I' * n}: everyone deserves kindness today")

    def reply(messages):
        with open(log_path, "a") as f:
            f.write(f"{pid} {graph_parts.persona_of(messages)}"
                    f"{'/route' if graph_parts.is_route(messages) else ''}\n")
            f.flush()
            os.fsync(f.fileno())
        return inner(messages)

    settings = load_settings(data_dir=data_dir)
    parts = graph_parts.build(settings, EventBus(), reply, latency_s=0.25, memory=False,
                              max_rounds=3, dissonance_threshold=0.05)
    result = parts.graph.run(task_id, "How should we share 7 apples among 3 friends?",
                             resume=resume)
    (data_dir / f"result-{pid}.json").write_text(json.dumps(result, default=str))
    parts.graph.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
