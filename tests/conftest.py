"""Shared fixtures. Every test builds its parts on a temp data directory."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def settings(data_dir: Path):
    from a4ps.config import load_settings
    return load_settings(data_dir=data_dir)


@pytest.fixture
def bus():
    from a4ps.events import EventBus
    return EventBus()


@pytest.fixture
def embedder():
    """The cheap deterministic stand-in embedder (384-d)."""
    from a4ps.models.embeddings import HashEmbedder
    return HashEmbedder(dim=384)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The real runsc sandbox with the default limits, one per test module (a module
    that needs other limits defines its own ``sandbox``)."""
    from a4ps.config import load_settings
    from a4ps.tools.sandbox import make_sandbox
    sb = make_sandbox(load_settings(data_dir=tmp_path_factory.mktemp("sb")))
    assert sb.available, sb.reason
    yield sb
    sb.close()


# --- models (issue 3): one real embedded model per test session -------------------

def _shared_model_cache() -> Path:
    """Dequantized SmolLM2 cache shared by test sessions (dequantizing takes ~20 s).

    Order: A4PS_MODELS__EMBEDDED__CACHE_DIR, A4PS_TEST_MODEL_CACHE, then
    <repo>/.pytest_cache/a4ps-model-cache. Daemon subprocesses in tests reuse it by
    setting A4PS_MODELS__EMBEDDED__CACHE_DIR to the ``model_cache_dir`` fixture.
    """
    env = os.environ.get("A4PS_MODELS__EMBEDDED__CACHE_DIR") or os.environ.get("A4PS_TEST_MODEL_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".pytest_cache" / "a4ps-model-cache"


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    d = _shared_model_cache()
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def minilm():
    """The real MiniLM embedder (the product's), loaded once per session and shared."""
    from a4ps.config import ModelSettings
    from a4ps.models.embeddings import MiniLMEmbedder
    return MiniLMEmbedder(batch_size=ModelSettings().embedding_batch_size)


@pytest.fixture(scope="session")
def embedded_models(tmp_path_factory, model_cache_dir, minilm):
    """A ModelManager on the real embedded backend (SmolLM2-135M) + MiniLM embedder.

    Session-scoped: load it once, share it. Its own bus is ``embedded_models.bus``.
    """
    from a4ps.config import load_settings
    from a4ps.events import EventBus
    from a4ps.models.embedded import EmbeddedBackend
    from a4ps.models.manager import ModelManager
    s = load_settings(data_dir=tmp_path_factory.mktemp("models-data"))
    s.models = s.models.model_copy(update={"embedded": s.models.embedded.model_copy(
        update={"cache_dir": model_cache_dir})})
    mm = ModelManager(s, EventBus(), backend=EmbeddedBackend(s),
                      embedder=minilm)
    yield mm
    mm.release()


# --- a real, small filesystem that can fill up (issue 13) --------------------------

def mount_tmpfs(path: Path, size_mb: int) -> bool:
    """Mount a tmpfs of ``size_mb`` at ``path``; False where this process may not
    (not root, no CAP_SYS_ADMIN): callers then fall back to RLIMIT_FSIZE."""
    import subprocess
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700",
                            "tmpfs", str(path)], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def unmount(path: Path) -> None:
    import subprocess
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill_up(directory: Path, leave_bytes: int = 0) -> Path:
    """Write a ballast file until the filesystem is full (minus ``leave_bytes``)."""
    ballast = directory / "ballast.bin"
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"\0" * max(0, free - leave_bytes))
        while not leave_bytes:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return ballast


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Fallback where no tmpfs can be mounted: RLIMIT_FSIZE makes writes past
    ``nbytes`` fail (EFBIG, with SIGXFSZ ignored) for this whole process."""
    import resource
    import signal
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)


@pytest.fixture
def small_fs(tmp_path):
    """A directory on a 16 MB tmpfs (yields None where mounting is not allowed)."""
    mnt = tmp_path / "smallfs"
    if not mount_tmpfs(mnt, 16):
        yield None
        return
    try:
        yield mnt
    finally:
        unmount(mnt)


# --- PostgreSQL (issue 16, scaling): one throwaway cluster per test session ---------

@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server in a temp dir on a free port (tests/pg_cluster.py)."""
    from pg_cluster import PostgresCluster, PostgresUnavailable
    try:
        cluster = PostgresCluster().start()
    except PostgresUnavailable as e:
        pytest.fail(str(e))
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_dsn(postgres) -> str:
    """A fresh empty database on the session's cluster."""
    import uuid
    return postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
