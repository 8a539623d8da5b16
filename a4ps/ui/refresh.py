"""When the display catches up with the events: staged changes, all regions at once.

Events change models at once, but widgets only through :meth:`DisplayRefresh.stage`
(the latest value wins: a burst of changes to one widget is one change). The window
is split into regions (the morph canvas, the transcript, the log, the graph strip,
the status bar, the shelf). Kivy repaints the whole window whenever anything in it
changed, and on a software rasteriser that repaint has a large fixed cost (tens of
milliseconds at 1280×800, mostly the buffer swap), so the regions are not refreshed
each on its own clock: every pending region is applied in the same frame, once per
``interval``. The interval grows with what such a frame measured (drawing and swap
included), so refreshing takes about a third of the time.

Staleness is bounded by construction: a change must be on screen ``budget_s`` after
its event was published. A refresh shows it one frame later, and a frame costs at most
``peak_cost`` (the slowest of the recent refreshing frames), so a change may wait at
most ``deadline_age() = budget_s - peak_cost - lead_s`` (``lead_s``: a tick, and the
time the event took to arrive) before its refresh: :meth:`due` refreshes once any
pending change (a prepared one included) is that old, whatever the pace says.

Some regions are *prepared*: their staged changes are taken a few at a time in every
frame, not at the refresh (morph pictures are composed on the CPU ahead of the
repaint that shows them); what they prepared is :meth:`mark` ed on the region that
shows it, with the time of its oldest event. At a refresh, :meth:`take_overdue` gives
the prepared changes that cannot wait for the next one: composed then, whatever the
per-frame budget says. No Kivy here; all times are on one clock (``clock``, wall time
by default: an event's time is when the daemon published it).
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

PEAK_FRAMES = 20     # the refreshing frames whose slowest bounds what the next costs


class DisplayRefresh:
    """Staged widget changes and dirty marks, per region, and when to apply them."""

    def __init__(self, regions: Iterable[str], *, interval: float = 0.1,
                 max_interval: float = 0.3, cost_factor: float = 3.0,
                 prepared: dict[str, str] | None = None, budget_s: float = 0.5,
                 lead_s: float = 0.05, clock: Callable[[], float] = time.time) -> None:
        self.regions = list(regions)
        self.prepared = dict(prepared or {})        # prepared region -> region showing it
        self.base_interval = interval
        self.max_interval = max_interval
        self.cost_factor = cost_factor
        self.budget_s = budget_s
        self.lead_s = lead_s
        self.clock = clock
        names = self.regions + [r for r in self.prepared if r not in self.regions]
        self.staged: dict[str, OrderedDict[Any, dict[str, Any]]] = {r: OrderedDict() for r in names}
        self.since: dict[str, dict[Any, float]] = {r: {} for r in names}
        self.marked: dict[str, float] = {}          # region -> its oldest unshown change
        self.region_of: dict[Any, str] = {}
        self.last = 0.0                             # clock time of the last refresh
        self.cost = 0.0                             # what a refreshing frame costs (s)
        self._costs: deque[float] = deque(maxlen=PEAK_FRAMES)
        self.max_staleness_s = 0.0
        self.refreshes = 0
        self.forced = 0                             # refreshes a deadline brought forward
        self._shown_oldest: float | None = None     # oldest change in the frame drawn now

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
        """A region whose view is synced as a whole (the transcript, the log), or
        that shows what a prepared region made (``at``: the oldest change's time)."""
        old = self.marked.get(region)
        self.marked[region] = at if old is None else min(old, at)

    # -- choosing ----------------------------------------------------------------------
    def pending(self, region: str) -> bool:
        return bool(self.staged[region]) or region in self.marked

    @property
    def settled(self) -> bool:
        return not self.marked and not any(self.staged.values())

    @property
    def peak_cost(self) -> float:
        """The slowest of the recent refreshing frames (what the next may cost)."""
        return max(self._costs, default=self.cost)

    def deadline_age(self) -> float:
        """How old a pending change may get before its refresh starts, for it to be on
        screen within ``budget_s``; never below the base interval (when frames cost
        more than the budget allows, no pacing can keep it)."""
        return max(self.base_interval, self.budget_s - self.peak_cost - self.lead_s)

    def interval(self) -> float:
        """The pace: three times a refreshing frame's cost, between the base interval
        and ``max_interval``, and never longer than :meth:`deadline_age`."""
        return min(self.max_interval, self.deadline_age(),
                   max(self.base_interval, self.cost_factor * self.cost))

    def oldest_pending(self) -> float | None:
        """The time of the oldest change not yet on its way to the screen (a prepared
        region's staged changes included)."""
        times = [t for r in self.since for t in self.since[r].values()]
        times += self.marked.values()
        return min(times) if times else None

    def due(self, now: float | None = None) -> list[str]:
        """The regions to refresh this frame: every pending one once ``interval`` has
        passed since the last refresh; sooner when a pending change (a prepared one
        not yet composed included: then the region showing it too) reaches
        :meth:`deadline_age`, but never within the base interval of the last; else
        none."""
        now = self.clock() if now is None else now
        if now - self.last < self.base_interval:
            return []
        pending = [r for r in self.regions if r not in self.prepared and self.pending(r)]
        if pending and now - self.last >= self.interval():
            return pending
        oldest = self.oldest_pending()
        if oldest is None or now - oldest < self.deadline_age():
            return []
        for prep, shown in self.prepared.items():     # it may be one not yet composed
            if self.staged[prep] and shown not in pending:
                pending.append(shown)
        self.forced += 1
        return pending

    def take_overdue(self, region: str, now: float | None = None
                     ) -> list[tuple[Any, dict[str, Any], float]]:
        """A prepared region's staged changes that cannot wait for the next refresh
        (they would pass :meth:`deadline_age` before it may come), oldest first, with
        their event times: the refresh now composes them whatever the frame budget."""
        now = self.clock() if now is None else now
        cutoff = now + self.base_interval + self.lead_s - self.deadline_age()
        out = []
        since = self.since[region]
        for widget in [w for w, t in since.items() if t <= cutoff]:
            props = self.staged[region].pop(widget)
            self.region_of.pop(widget, None)
            out.append((widget, props, since.pop(widget)))
        out.sort(key=lambda item: item[2])
        return out

    def take(self, region: str, wall: float | None = None,
             limit: int | None = None) -> list[tuple[Any, dict[str, Any]]]:
        """The region's staged changes (oldest first, at most ``limit``), now counted
        as applied (a prepared region's are counted when the region showing them is)."""
        wall = self.clock() if wall is None else wall
        staged = self.staged[region]
        out: list[tuple[Any, dict[str, Any]]] = []
        while staged and (limit is None or len(out) < limit):
            widget, props = staged.popitem(last=False)
            since = self.since[region].pop(widget, wall)
            if region not in self.prepared:
                self._applied_change(since, wall)
            self.region_of.pop(widget, None)
            out.append((widget, props))
        marked = self.marked.pop(region, None) if region not in self.prepared else None
        if marked is not None:
            self._applied_change(marked, wall)
        return out

    def take_one(self, region: str) -> tuple[Any, dict[str, Any], float] | None:
        """The oldest staged change of a prepared region and its event time."""
        staged = self.staged[region]
        if not staged:
            return None
        widget, props = staged.popitem(last=False)
        self.region_of.pop(widget, None)
        return widget, props, self.since[region].pop(widget, self.clock())

    def _applied_change(self, since: float, wall: float) -> None:
        self.max_staleness_s = max(self.max_staleness_s, wall - since)
        if self._shown_oldest is None or since < self._shown_oldest:
            self._shown_oldest = since

    def applied(self, regions: Iterable[str], now: float | None = None) -> None:
        self.last = self.clock() if now is None else now
        self.refreshes += len(list(regions))

    def drawn(self, seconds: float, wall: float | None = None) -> None:
        """The frame that applied a refresh is on screen, ``seconds`` after it began:
        the changes it showed were that stale, and refreshes cost that much."""
        wall = self.clock() if wall is None else wall
        if self._shown_oldest is not None:
            self.max_staleness_s = max(self.max_staleness_s, wall - self._shown_oldest)
            self._shown_oldest = None
        # rises at once, decays slowly: one cheap frame must not hide a slow refresh
        self.cost = seconds if seconds > self.cost else 0.8 * self.cost + 0.2 * seconds
        self._costs.append(seconds)
