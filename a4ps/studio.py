"""The contrapunto graph for LangGraph Studio / ``langgraph dev`` (``langgraph.json``).

The LangGraph server imports ``langgraph.json``'s ``a4ps/studio.py:make_graph`` and,
because it is a function, calls it for every run and every schema request. So the
factory is cheap and shares one :class:`~a4ps.system.System` per server process:

* built on the first node that runs (drawing the graph or its schemas builds nothing);
* started *without* the background services (curator, motivator, philosopher): a
  Studio run is one task, not a living daemon;
* on its own data directory, ``langgraph.json``'s ``env`` sets ``A4PS_DATA_DIR`` to
  ``data/studio``, and it holds that directory's daemon lock for as long as the
  server runs, so no daemon and no second server can open the same image;
* stopped (image saved, lock released) when the server process exits.

The compiled graph has no checkpointer of ours: the server brings its own. This
module sits above ``system.py`` on purpose, so ``a4ps/cognition`` never imports it.
"""
from __future__ import annotations

import atexit
import logging
import threading
from typing import Any, Callable

from a4ps.cognition.graph import CognitiveGraph
from a4ps.config import Settings, load_settings
from a4ps.system import System

log = logging.getLogger(__name__)


class StudioHost:
    """One lazily built System behind one compiled graph."""

    def __init__(self, settings: Settings, *, make_system: Callable[[Settings], Any] | None = None
                 ) -> None:
        self.settings = settings
        self._make_system = make_system
        self._lock = threading.Lock()
        self._system: Any = None
        self._compiled: Any = None
        self.cognitive: CognitiveGraph | None = None
        self.systems_built = 0

    def system(self) -> Any:
        """The System, built and started (services off) on first use. ``System.start``
        takes the data directory's one-writer lock (a4ps.lock) and holds it until
        ``stop``; a daemon on the same directory makes it raise DataLockHeld."""
        with self._lock:
            if self._system is None:
                if self._make_system is not None:
                    system = self._make_system(self.settings)
                else:
                    system = System(self.settings)
                system.start(services=False)
                self._system = system
                self.systems_built += 1
                log.info("LangGraph Studio: System started on %s (no background services)",
                         self.settings.data_dir)
            return self._system

    def graph(self) -> Any:
        """The compiled graph (built once; the parts resolve to the System on first use)."""
        with self._lock:
            if self._compiled is None:
                lazy = _Lazy(self.system)
                cg = CognitiveGraph(lazy.part("protos"), lazy.part("models"),
                                    lazy.part("memory"), lazy.part("bus"), self.settings,
                                    forge=lazy.part("forge"), registry=lazy.part("tools"),
                                    checkpointer_path=False)
                self.cognitive = cg
                self._compiled = cg.compile()
            return self._compiled

    def close(self) -> None:
        """Stop the System: its image is saved and the data directory's lock released."""
        with self._lock:
            system, self._system = self._system, None
        if system is not None:
            system.stop()


class _Lazy:
    """Parts of a System that is built the first time one of them is used."""

    def __init__(self, get_system: Callable[[], Any]) -> None:
        self._get = get_system

    def part(self, name: str) -> Any:
        return _Part(lambda: getattr(self._get(), name))


class _Part:
    def __init__(self, get: Callable[[], Any]) -> None:
        self._get = get

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)


_host: StudioHost | None = None
_host_lock = threading.Lock()


def host() -> StudioHost:
    """This server process's StudioHost (settings read once, from the environment)."""
    global _host
    with _host_lock:
        if _host is None:
            _host = StudioHost(load_settings())
            atexit.register(_host.close)
        return _host


def make_graph() -> Any:
    """``langgraph.json``'s factory: the compiled contrapunto over this process's System.

    Input: ``{"task_id": "...", "task": "..."}``; output: the graph's whole state
    (``answer``, ``answer_source``, ``decisions``, ``rounds``, ...).
    """
    return host().graph()
