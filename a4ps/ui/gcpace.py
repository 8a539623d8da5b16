"""When Python's cyclic garbage collector may stop the UI: never in a refreshing frame.

A full collection (the oldest generation) walks every object the interpreter tracks:
with Kivy and 200 morphs about 155,000, ~55 ms measured in ``bench/bench_ui.py``, and
CPython starts one whenever enough young collections have happened, in whatever frame
that is. Measured: it landed in a display refresh (itself ~60 ms) and made the worst
frame at 1,000 events/s 143 ms. So, while the app runs:

* :meth:`GcPacer.settle` (at start; after a snapshot built the morphs, in the next
  quiet frame through :meth:`GcPacer.settle_later`) collects once
  and freezes what lives (``gc.freeze``): later collections do not walk the modules,
  widgets and morphs the UI lives on, so they cost what was made since;
* full collections do not start on their own (the oldest generation's threshold is
  out of reach); :meth:`GcPacer.collect_due` runs the one CPython would have run,
  once the young collections since the last say so, in a frame the controller
  chooses: the one after a refresh (the next refresh is at least its base interval
  away, and that frame draws nothing), or one where nothing waits to be shown (so an
  idle window still collects).

Young collections (generations 0 and 1, ~1-6 ms each with the heap frozen) are
held back too while a refresh frame runs (:meth:`hold` when the refresh starts,
:meth:`release` in the next frame: ``gc.disable``/``gc.enable``; CPython then
collects what that frame left at its next allocation).

Frozen objects are still freed by reference counting; a reference cycle among them
waits for the next :meth:`settle` (a new snapshot) or :meth:`stop` (which unfreezes
and restores the thresholds it found).
"""
from __future__ import annotations

import gc as _gc
from typing import Any

NEVER = 1 << 30      # an oldest-generation threshold no count reaches


class GcPacer:
    """Full garbage collections moved out of refreshing frames (see module doc)."""

    def __init__(self, collector: Any = _gc) -> None:
        self.gc = collector
        self._threshold: tuple[int, ...] | None = None   # CPython's, while paced
        self.full_every = 10                             # young collections per full
        self.collections = 0                             # full ones this pacer ran
        self.held = False                                # collections off this frame
        self._settle_due = False                         # settle() at the next collect_due()

    @property
    def active(self) -> bool:
        return self._threshold is not None

    def start(self) -> None:
        if self.active:
            return
        self._threshold = tuple(self.gc.get_threshold())
        self.full_every = max(1, self._threshold[2]) if len(self._threshold) > 2 else 10
        self.gc.set_threshold(self._threshold[0], self._threshold[1], NEVER)
        self.settle()

    def settle(self) -> None:
        """Collect what is garbage now and freeze the rest (the UI's long-lived parts).

        Unfreezes first, so a cycle frozen at the last settle that has died since
        (a deleted morph, a transcript turn scrolled out) is freed now instead of
        waiting for :meth:`stop`: what leaks between two snapshots stays bounded."""
        if not self.active:
            return
        self.gc.unfreeze()
        self.gc.collect()
        self.gc.freeze()

    def settle_later(self) -> None:
        """:meth:`settle` in the next frame that runs :meth:`collect_due` (a snapshot's
        frame already applies every region: its collection waits for a quiet one)."""
        self._settle_due = self.active

    def collect_due(self) -> bool:
        """In a frame where it delays no refresh: a settle asked for, else the full
        collection CPython's thresholds call for now, if any (True when one ran)."""
        if self._settle_due:
            self._settle_due = False
            self.settle()
            self.collections += 1
            return True
        if not self.active or self.gc.get_count()[2] < self.full_every:
            return False
        self.gc.collect(2)
        self.collections += 1
        return True

    def hold(self) -> None:
        """No collection at all until :meth:`release` (a refresh frame runs)."""
        if self.active and not self.held and self.gc.isenabled():
            self.gc.disable()
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gc.enable()

    def stop(self) -> None:
        self.release()
        threshold, self._threshold = self._threshold, None
        if threshold is None:
            return
        self.gc.set_threshold(*threshold)
        self.gc.unfreeze()
