"""How many threads the embedded engine decodes fastest with on this machine: measured
once, at the first load, and remembered.

The thread policy (:mod:`a4ps.models.threads`) says how many threads the process *may*
use (physical cores, the cgroup quota). Whether a 135M model decodes faster on all of
them is a property of the machine, not a rule: each op is tiny, and waking a passive
OpenMP thread for every op can cost more than splitting it saves. On a 2-core AMD VM,
CTranslate2 decoded at 40 tokens/s on one thread and 28 on two; elsewhere two threads
win. So the first load on a machine times a few greedy decode steps on one thread and
on the policy's N (alternating, mirrored: 1, N, N, 1, ...), keeps the faster, and writes the
choice to a small JSON file beside the converted model, keyed by what would change the
answer (CPU model, CPU set, cgroup quota, policy, engine version, model shape). Later
loads read it (no measuring). ``models.embedded.threads`` overrides it all.

Thread count never changes the text: greedy output was identical on one and two
threads (``tests/test_thread_choice.py``: int8 and float32, six prompts, and ``score``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from a4ps.models.threads import (available_cpus, cgroup_cpu_limit, physical_cores,
                                 spinning_allowed)

log = logging.getLogger(__name__)

Source = Literal["setting", "policy", "probe", "cache"]
# seconds per decoded token at a thread count, ``tokens`` steps long
DecodeTimer = Callable[[int, int], float]
PROBE_TOKENS = 12
PROBE_ROUNDS = 4


@dataclass(frozen=True)
class ThreadChoice:
    """The threads the engine runs with, and why (for the loaded event and the status)."""
    threads: int
    policy: int
    source: Source
    rates: dict[int, float] = field(default_factory=dict)   # tokens/s per thread count
    load: float | None = None          # the 1-minute load average when it was timed

    def info(self) -> dict[str, Any]:
        """Plain data for ``model.loaded`` and ``system.status``."""
        return {"threads": self.threads, "policy": self.policy, "source": self.source,
                "tokens_per_s": {str(k): round(v, 1) for k, v in sorted(self.rates.items())},
                "load_average": self.load}

    def describe(self) -> str:
        rates = ", ".join(f"{k} thread{'s' if k > 1 else ''} {v:.1f} tok/s"
                          for k, v in sorted(self.rates.items()))
        how = {"setting": "models.embedded.threads", "policy": "the thread policy",
               "probe": "timed now", "cache": "timed earlier on this machine"}[self.source]
        at = f" at load average {self.load:.1f}" if self.load is not None else ""
        return f"{self.threads} thread(s) ({how}" + (f": {rates}{at}" if rates else "") + ")"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (a different CPU may answer differently)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def machine_key(policy: int, engine: str, model_shape: str) -> dict[str, Any]:
    """What would change the fastest thread count: the CPU, how much of it this process
    may use, the policy's N, how idle threads wait (spinning changes the cost of waking
    a thread per op, which is what decides 1 against N), the engine (and its version)
    and the model's shape."""
    cpus = available_cpus()
    return {"cpu": cpu_model(), "cpus": len(cpus), "cores": physical_cores(cpus),
            "cgroup": cgroup_cpu_limit(), "policy": int(policy), "spin": spinning_allowed(),
            "engine": engine, "model": model_shape}


def measure(candidates: Sequence[int], timer: DecodeTimer, *, tokens: int = PROBE_TOKENS,
            rounds: int = PROBE_ROUNDS) -> dict[int, float]:
    """Tokens/s per candidate thread count: the median of its rounds. Rounds alternate
    and mirror (1, N, N, 1, 1, N, N, 1), so a load that rises or falls during the probe
    weighs on both alike, and the median ignores a burst of other work that lands on
    one round (on the shared VM a sum let one such burst pick the slower count)."""
    import statistics
    seconds: dict[int, list[float]] = {c: [] for c in candidates}
    order = list(candidates)
    for r in range(max(1, rounds)):
        for c in (order if r % 2 == 0 else order[::-1]):
            seconds[c].append(timer(c, tokens))
    return {c: 1.0 / m if (m := statistics.median(v)) > 0 else float("inf")
            for c, v in seconds.items()}


def fastest(rates: Mapping[int, float], policy: int) -> int:
    """The faster thread count; a tie keeps the policy's."""
    best = max(rates.values())
    return policy if rates.get(policy) == best else min(c for c, v in rates.items() if v == best)


def read_cached(path: Path, key: dict[str, Any]) -> ThreadChoice | None:
    """The remembered choice if it was made for this ``key`` (else None: measure again)."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        load = data.get("load_average")
        return ThreadChoice(int(data["threads"]), int(key["policy"]), "cache",
                            {int(k): float(v) for k, v in data.get("rates", {}).items()},
                            float(load) if load is not None else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_cached(path: Path, key: dict[str, Any], choice: ThreadChoice) -> None:
    """Atomically (a reader never sees half a file); a read-only cache only costs a
    probe at the next load, so a failure to write is logged, not raised."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"key": key, "threads": choice.threads,
                                   "rates": {str(k): v for k, v in choice.rates.items()},
                                   "load_average": choice.load,
                                   "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime())}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not remember the thread choice in %s (%s); the next load "
                    "times it again", path, e)
        tmp.unlink(missing_ok=True)


def _load_average() -> float | None:
    """What else the machine was doing while the probe ran (a saturated machine can
    favour more threads: each runnable thread gets its own share of the CPU)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def choose_threads(setting: int, policy: int, cache: Path, key: dict[str, Any],
                   timer: DecodeTimer | None) -> ThreadChoice:
    """The threads to run with: the setting if given; the policy's N if it is 1 or there
    is nothing to time with; else the remembered choice for this key, or a fresh probe
    of 1 against N (remembered). A probe that fails (the model ends its reply at once,
    memory for a second engine runs out) costs only the choice: the policy's N, not
    remembered, so the next load times it again."""
    if setting > 0:
        return ThreadChoice(int(setting), policy, "setting")
    if policy <= 1 or timer is None:
        return ThreadChoice(policy, policy, "policy")
    cached = read_cached(cache, key)
    if cached is not None:
        return cached
    try:
        rates = measure((1, policy), timer)
    except Exception as e:
        log.warning("timing the thread counts failed (%s: %s); running on the policy's %d",
                    type(e).__name__, e, policy)
        return ThreadChoice(policy, policy, "policy")
    choice = ThreadChoice(fastest(rates, policy), policy, "probe", rates, _load_average())
    write_cached(cache, key, choice)
    return choice
