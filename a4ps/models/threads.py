"""How many threads the embedded model may use, and how they wait.

On a shared machine the two ways to lose are too many threads (more than the cores
this process may really run on: the CPU affinity mask and the cgroup CPU quota, not
``os.cpu_count()``) and threads that *spin* while they wait for each other. A
spinning OpenMP pool collapses when another process competes for the cores: each
thread burns its time slice waiting for a sibling that is not running (transformers
fell from 17.6 to 0.49 tokens/s with two busy processes beside it). So:

* threads = physical cores available to the process (hyper-threads share one core's
  arithmetic units and only add contention), capped by the cgroup quota;
  ``models.embedded.threads`` overrides;
* OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``) unless the user set it.
  The OpenMP runtime reads that when it is loaded, so :func:`apply_openmp_policy` must
  run before ``import ctranslate2`` / ``import torch``; the CLI calls it first thing,
  and each engine calls it again just before importing its library.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def available_cpus() -> set[int]:
    """CPUs this process may run on (the affinity mask)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup quota allows (cgroup v2 cpu.max or v1), or None."""
    try:
        max_quota, max_period = (root / "cpu.max").read_text().split()[:2]
        if max_quota != "max":
            return int(max_quota) / int(max_period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def physical_cores(cpus: set[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """How many distinct physical cores ``cpus`` spans (SMT siblings counted once)."""
    cores = set()
    for c in cpus:
        topo = sysfs / f"cpu{c}" / "topology"
        try:
            pkg = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
            cores.add((pkg, core))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def default_threads() -> int:
    """Physical cores in the affinity mask, capped by the cgroup quota (at least 1)."""
    n = physical_cores(available_cpus())
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)


def resolve_threads(setting: int | None) -> int:
    """``models.embedded.threads`` if set (> 0), else :func:`default_threads`."""
    return int(setting) if setting and int(setting) > 0 else default_threads()


def apply_openmp_policy() -> None:
    """Make OpenMP pools sleep instead of spin while they wait (unless the user chose)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def spinning_allowed() -> bool:
    """Whether thread pools may spin while they wait: only if the user asked for it
    (``OMP_WAIT_POLICY=ACTIVE``). Pools that are not OpenMP (ONNX Runtime's own) take
    the same answer, so one setting governs every engine."""
    return os.environ.get("OMP_WAIT_POLICY", "PASSIVE").strip().upper() == "ACTIVE"


def ort_session_options(threads: int) -> dict[str, int | str]:
    """ONNX Runtime session options for the thread policy: ``threads`` intra-op
    threads, one inter-op, and no spinning unless allowed (ORT's pool spins by default,
    and a spinning pool collapses when another process competes for the cores).
    Unknown keys in genai_config's ``session_options`` are ORT session config entries."""
    spin = "1" if spinning_allowed() else "0"
    return {"intra_op_num_threads": max(1, int(threads)), "inter_op_num_threads": 1,
            "session.intra_op.allow_spinning": spin,
            "session.inter_op.allow_spinning": spin}
