"""When the display catches up with the events: staged changes, one region per frame.

Events change models at once, but widgets only through :meth:`DisplayRefresh.stage`
(the latest value wins). The window is split into regions that re-render on their own
(each morph layer, the transcript, the log, the graph strip and status bar...): a
frame re-renders only the regions whose changes it applies, and the others cost one
quad each. A region is due ``interval`` seconds after its last refresh; the interval
grows with what the frames that refreshed it cost to draw (measured), so repainting
takes no more than about a third of the time, but never past ``max_interval``, which
bounds how stale the display can get. The regions due at the same moment are applied
together: on a software rasteriser every repaint has a fixed cost, so fewer repaints
beat smaller ones. No Kivy here.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Iterable


class DisplayRefresh:
    """Staged widget changes and dirty marks, per region, and the choice of region."""

    def __init__(self, base: dict[str, float], *, max_interval: float = 0.3,
                 cost_factor: float = 3.0) -> None:
        self.base = dict(base)
        self.max_interval = max_interval
        self.cost_factor = cost_factor
        self.staged: dict[str, OrderedDict[Any, dict[str, Any]]] = {r: OrderedDict() for r in base}
        self.since: dict[str, dict[Any, float]] = {r: {} for r in base}
        self.marked: dict[str, float] = {}          # region -> when it was first marked
        self.region_of: dict[Any, str] = {}
        self.last: dict[str, float] = {r: 0.0 for r in base}
        self.cost: dict[str, float] = {r: 0.0 for r in base}
        self.max_staleness_s = 0.0
        self.refreshes = 0

    # -- staging -------------------------------------------------------------------
    def stage(self, region: str, widget: Any, props: dict[str, Any], at: float) -> None:
        """``props`` for ``widget`` at ``region``'s next refresh (``at``: wall time of
        the event that asked)."""
        old = self.region_of.get(widget)
        if old is not None and old != region and widget in self.staged[old]:
            carried = self.staged[old].pop(widget)       # it moved region (a new layer)
            at = min(at, self.since[old].pop(widget, at))
            props = {**carried, **props}
        self.region_of[widget] = region
        pending = self.staged[region].get(widget)
        if pending is None:
            self.staged[region][widget] = dict(props)
            self.since[region][widget] = at
        else:
            pending.update(props)

    def staged_value(self, widget: Any, prop: str, default: Any) -> Any:
        region = self.region_of.get(widget)
        if region is None:
            return default
        return self.staged[region].get(widget, {}).get(prop, default)

    def drop(self, widget: Any) -> None:
        region = self.region_of.pop(widget, None)
        if region is not None:
            self.staged[region].pop(widget, None)
            self.since[region].pop(widget, None)

    def mark(self, region: str, at: float) -> None:
        """A region whose view is synced as a whole (the transcript, the log)."""
        self.marked.setdefault(region, at)

    # -- choosing ----------------------------------------------------------------------
    def pending(self, region: str) -> bool:
        return bool(self.staged[region]) or region in self.marked

    @property
    def settled(self) -> bool:
        return not self.marked and not any(self.staged.values())

    def oldest(self, region: str) -> float | None:
        times = list(self.since[region].values())
        if region in self.marked:
            times.append(self.marked[region])
        return min(times) if times else None

    def interval(self, region: str) -> float:
        return min(self.max_interval, max(self.base[region],
                                          self.cost_factor * self.cost[region]))

    def due(self, now: float | None = None, wall: float | None = None) -> list[str]:
        """The regions to refresh this frame: each pending one whose interval has
        passed, or whose oldest change has waited ``max_interval``."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        out = []
        for region in self.base:
            oldest = self.oldest(region)
            if oldest is None:
                continue
            if now - self.last[region] >= self.interval(region) or \
                    wall - oldest >= self.max_interval:
                out.append(region)
        return out

    def take(self, region: str, wall: float | None = None,
             limit: int | None = None) -> list[tuple[Any, dict[str, Any]]]:
        """The region's staged changes (oldest first, at most ``limit``), now counted
        as applied."""
        wall = time.time() if wall is None else wall
        staged = self.staged[region]
        out: list[tuple[Any, dict[str, Any]]] = []
        while staged and (limit is None or len(out) < limit):
            widget, props = staged.popitem(last=False)
            since = self.since[region].pop(widget, wall)
            self.max_staleness_s = max(self.max_staleness_s, wall - since)
            self.region_of.pop(widget, None)
            out.append((widget, props))
        marked = self.marked.pop(region, None)
        if marked is not None:
            self.max_staleness_s = max(self.max_staleness_s, wall - marked)
        return out

    def applied(self, region: str, now: float | None = None) -> None:
        self.last[region] = time.monotonic() if now is None else now
        self.refreshes += 1

    def measured(self, regions: Iterable[str], seconds: float) -> None:
        """A frame that re-rendered ``regions`` took ``seconds`` to draw."""
        for region in regions:
            old = self.cost.get(region, 0.0)
            # rises at once, decays slowly: one cheap frame must not hide a slow region
            self.cost[region] = seconds if seconds > old else 0.8 * old + 0.2 * seconds
