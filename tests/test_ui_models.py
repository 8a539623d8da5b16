"""The UI's plain rules, without a window: layout, activity, task records, the daemon's
step buffer, diff text, window geometry."""
from __future__ import annotations

import itertools

import pytest

from a4ps.step_buffer import StepBuffer
from a4ps.ui import layout as L
from a4ps.ui import values as V
from a4ps.ui import window as W
from a4ps.ui.activity import ActivityModel, GraphShape
from a4ps.ui.codeeditor import error_line
from a4ps.ui.tasklog import TaskRecord

from test_ui import GRAPH


def overlaps(a, b):
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


@pytest.mark.parametrize("size", [(480, 470), (790, 680), (1400, 950)])
def test_layout_flows_top_left_inside_without_overlap(size):
    w, h = size
    boxes = [L.Box(n, 208, 124) for n in ("ALFRED", "BRICK", "ROBIN")] + \
        [L.Box("tool:fib", 208, 80)]
    spots = L.place(boxes, w, h)
    assert spots["ALFRED"] == (L.MARGIN, L.MARGIN)
    rects = {n: (x, y, x + b.width, y + b.height) for b in boxes for n, (x, y) in
             [(b.name, spots[b.name])]}
    for r in rects.values():
        assert 0 <= r[0] and r[2] <= w and 0 <= r[1] and r[3] <= h
    for a, b in itertools.combinations(rects.values(), 2):
        assert not overlaps(a, b)


def test_layout_keeps_saved_spots_inside_and_flows_around_them():
    boxes = [L.Box("A", 200, 100, (5000, 5000)), L.Box("B", 200, 100, (12, 12)),
             L.Box("C", 200, 100)]
    spots = L.place(boxes, 600, 400)
    assert spots["A"] == (400, 300)               # pulled back into view
    assert spots["B"] == (12, 12)
    c = spots["C"]
    assert not overlaps((*c, c[0] + 200, c[1] + 100), (12, 12, 212, 112))
    assert L.saved_spot({"left": 3, "top": 4.5}) == (3.0, 4.5)
    assert L.saved_spot([360, 420]) is None and L.saved_spot({"left": True, "top": 1}) is None


def test_graph_shape_picks_the_next_node():
    g = GraphShape(GRAPH)
    assert g.next_node("alfred_route", {}, None) == "recall"
    assert g.next_node("recall", {}, "contrapunto") == "brick"
    assert g.next_node("recall", {}, "direct") == "alfred_synthesize"
    assert g.next_node("brick", {"tool_request": {"name": "x"}}, None) == "forge"
    assert g.next_node("brick", {"tool_request": None}, None) == "robin"
    assert g.next_node("measure", {"stop": None}, None) == "brick"
    assert g.next_node("measure", {"stop": "converged"}, None) == "alfred_synthesize"
    assert g.next_node("remember", {}, None) is None
    cols = g.layers()
    assert cols[0] == ["__start__"] and cols[-1] == ["__end__"]
    flat = [n for c in cols for n in c]
    assert flat.index("recall") < flat.index("brick") < flat.index("measure") \
        < flat.index("alfred_synthesize")
    assert ("measure", "brick") in g.back_edges()


def test_activity_names_who_is_doing_what():
    a = ActivityModel(GraphShape(GRAPH))
    a.on_step({"task_id": "t", "node": "alfred_route", "persona": "ALFRED",
               "text": "contrapunto", "route": "contrapunto"})
    assert a.node == "recall" and a.speaker == "" and a.label("ALFRED") == "idle"
    changed = a.on_step({"task_id": "t", "node": "recall", "persona": None, "text": "x"})
    assert changed == {"BRICK"} and a.label("BRICK") == "BRICK \u00b7 round 1 \u00b7 thinking"
    a.on_token({"task_id": "t", "node": "brick", "persona": "BRICK", "round": 1, "text": "Hi"})
    assert a.status("BRICK") == "speaking"
    a.on_step({"task_id": "t", "node": "brick", "persona": "BRICK", "round": 1})
    assert a.label("ROBIN") == "ROBIN \u00b7 round 1 \u00b7 thinking" and a.status("BRICK") == "idle"
    a.on_model_loading("m")
    assert a.status("ROBIN") == "loading model" and a.status("BRICK") == "idle"
    a.on_model_loaded()
    a.on_step({"task_id": "t", "node": "robin", "persona": "ROBIN", "round": 1})
    a.on_step({"task_id": "t", "node": "measure", "round": 1, "stop": None})
    assert a.label("BRICK") == "BRICK \u00b7 round 2 \u00b7 thinking"
    a.on_step({"task_id": "t", "node": "measure", "round": 2, "stop": "converged"})
    assert a.label("ALFRED") == "ALFRED \u00b7 answering"
    a.on_finetune("ROBIN", True)
    a.on_end("t")
    assert a.label("ALFRED") == "idle" and a.status("ROBIN") == "fine-tuning"


def test_task_record_concatenates_tokens_in_order_once():
    rec = TaskRecord("t")
    for i, piece in enumerate(["Hel", "lo", " there"], 1):
        assert rec.apply_token({"node": "brick", "persona": "BRICK", "round": 1,
                                "text": piece, "seq": i}, 100.0 + i, 10 + i)
    assert rec.partial.text == "Hello there"
    assert not rec.apply_token({"node": "brick", "persona": "BRICK", "round": 1,
                                "text": "lo", "seq": 2}, 200.0, 0)     # a repeat
    assert not rec.apply_token({"node": "brick", "text": "x", "seq": 9}, 200.0, 12)  # seen
    turn = rec.apply_step({"node": "brick", "persona": "BRICK", "round": 1,
                           "text": "Hello there"}, 104.0, 14)
    assert turn.text == "Hello there" and rec.partial is None
    t = rec.timeline[-1]
    assert t.node == "brick" and t.tokens == pytest.approx(len("Hello there") / 4)
    assert t.tokens_per_s is not None


def test_task_record_rebuilds_from_task_steps():
    rec = TaskRecord("t", started=10.0)
    rec.rebuild({"steps": [{"node": "alfred_route", "persona": "ALFRED", "text": "contrapunto",
                            "seq": 3, "ts": 11.0},
                           {"node": "recall", "persona": None, "text": "nothing", "seq": 4,
                            "ts": 12.5}],
                 "partial": {"node": "brick", "persona": "BRICK", "round": 1,
                             "text": "So far", "token_seq": 7, "tokens": 3, "seq": 9},
                 "seq": 9, "status": "running"})
    assert [t.node for t in rec.turns] == ["alfred_route", "recall"]
    assert [t.seconds for t in rec.timeline] == [1.0, 1.5]
    assert rec.partial.text == "So far" and rec.partial.token_seq == 7
    assert rec.seen(9) and not rec.seen(10)
    assert not rec.apply_token({"node": "brick", "persona": "BRICK", "round": 1,
                                "text": " dup", "seq": 7}, 13.0, 10)
    assert rec.apply_token({"node": "brick", "persona": "BRICK", "round": 1,
                            "text": " more", "seq": 8}, 13.0, 11)
    assert rec.partial.text == "So far more"


def test_step_buffer_keeps_steps_and_the_partial_turn():
    buf = StepBuffer(max_tasks=2)
    buf.record("task.queued", {"task_id": "a", "text": "q"}, 1, 1.0)
    buf.record("task.step", {"task_id": "a", "node": "alfred_route", "persona": "ALFRED",
                             "text": "contrapunto"}, 2, 2.0)
    for i, piece in enumerate(["Log", "ic", "."], 1):
        buf.record("task.token", {"task_id": "a", "node": "brick", "persona": "BRICK",
                                  "round": 1, "text": piece, "seq": i, "tokens": 1}, 2 + i, 3.0)
    buf.record("task.token", {"task_id": "a", "node": "brick", "persona": "BRICK", "round": 1,
                              "text": "ic", "seq": 2}, 6, 3.0)          # repeated: ignored
    buf.record("heartbeat", {"task_id": "a"}, 7, 3.0)                  # not a task topic
    got = buf.get("a")
    assert [s["node"] for s in got["steps"]] == ["alfred_route"]
    assert got["steps"][0]["seq"] == 2 and got["steps"][0]["ts"] == 2.0
    assert got["partial"]["text"] == "Logic." and got["partial"]["tokens"] == 3
    assert got["seq"] == 6 and got["status"] == "running"
    buf.record("task.step", {"task_id": "a", "node": "brick", "persona": "BRICK",
                             "text": "Logic."}, 8, 4.0)
    assert buf.get("a")["partial"] is None
    buf.record("task.done", {"task_id": "a", "answer": "x"}, 9, 5.0)
    assert buf.get("a")["status"] == "done" and buf.get("a")["seq"] == 8
    buf.record("task.queued", {"task_id": "b"}, 10, 5.0)
    buf.record("task.queued", {"task_id": "c"}, 11, 5.0)
    assert buf.get("a") is None and buf.get("c") is not None       # bounded


def test_snapshot_diff_markup_says_snapshot_and_now():
    text = V.image_diff_markup({
        "protos": {"added": ["ROBIN_2"], "removed": [], "changed": {
            "BRICK": {"slots": {"temperature": {"before": 0.7, "after": 0.2}},
                      "methods": {"hello": {"before": "def hello(self):\n    return 1\n",
                                            "after": "def hello(self):\n    return 2\n"}}}}},
        "codex": {"before_version": 3, "after_version": 4, "changed": [
            {"persona": "ROBIN", "principle": "care", "before": "Be kind.", "after": "Be bold."}]},
        "tools": {"added": ["fib"], "removed": []}})
    assert "ROBIN_2" in text and "snapshot: 0.7" in text and "now:      0.2" in text
    assert "- " in text and "return 2" in text and "v3 in the snapshot, v4 now" in text
    assert "ROBIN.care" in text and "snapshot: Be kind." in text
    assert "fib" in text
    assert V.image_diff_markup({}) == "[color=9aa3ad]identical to the live image[/color]"
    assert V.changes_line({"protos": ["BRICK", "ROBIN"], "codex": 0}) == "protos: BRICK, ROBIN"


def test_error_line_is_read_from_the_message():
    assert error_line("invalid_args: method 'hello': syntax error at line 3: '(' was never "
                      "closed") == 3
    assert error_line("no line here") is None


def test_window_geometry_is_saved_and_loaded(tmp_path):
    path = W.path_for(tmp_path)
    assert W.load(path) == W.Geometry()
    W.save(path, W.Geometry(1000, 700, 40, 60))
    assert W.load(path) == W.Geometry(1000, 700, 40, 60)
    W.save(path, W.Geometry(100, 100))                   # never below 800x600
    assert (W.load(path).width, W.load(path).height) == W.MIN_SIZE
    path.write_text("{broken")
    assert W.load(path) == W.Geometry()


def test_display_refresh_applies_all_regions_together_and_slows_down_when_frames_cost():
    from a4ps.ui.refresh import DisplayRefresh
    d = DisplayRefresh(("a", "b", "c"), interval=0.1, max_interval=0.3,
                       prepared={"p": "a"}, budget_s=0.5, lead_s=0.05)
    w1, w2, w3 = object(), object(), object()
    d.stage("a", w1, {"x": 1}, at=100.0)
    d.stage("a", w1, {"x": 2, "y": 3}, at=100.05)      # the latest value wins
    d.stage("b", w2, {"x": 9}, at=100.02)
    d.stage("p", w3, {"x": 5}, at=100.01)              # prepared: not due by itself
    assert d.staged_value(w1, "x", None) == 2 and not d.settled
    assert d.due(now=100.1) == ["a", "b"]              # every pending region at once
    assert d.take("a", wall=100.1) == [(w1, {"x": 2, "y": 3})]
    assert d.take("b", wall=100.1) == [(w2, {"x": 9})]
    d.applied(["a", "b"], now=100.1)
    assert d.max_staleness_s == pytest.approx(0.1)
    d.drawn(0.1, wall=100.2)                           # on screen 0.2 s after the event
    assert d.max_staleness_s == pytest.approx(0.2)
    assert d.interval() == pytest.approx(0.3)          # 3 x the frame's cost, capped
    d.stage("a", w1, {"x": 4}, at=100.25)
    d.mark("c", 100.26)
    assert d.due(now=100.3) == []                      # not before the interval...
    assert d.due(now=100.41) == ["a", "c"]             # ...then all of them
    assert d.take_one("p") == (w3, {"x": 5}, 100.01)   # prepared: one at a time
    for _ in range(40):
        d.drawn(0.01)                                  # cheap frames: back to the base
    assert d.interval() == pytest.approx(0.1)


def test_display_refresh_deadline_brings_a_refresh_forward_and_composes_overdue():
    from a4ps.ui.refresh import DisplayRefresh
    d = DisplayRefresh(("canvas", "log"), interval=0.1, max_interval=0.3,
                       prepared={"morphs": "canvas"}, budget_s=0.5, lead_s=0.05)
    d.drawn(0.2, wall=0.0)                             # frames cost 0.2 s
    assert d.deadline_age() == pytest.approx(0.25)     # 0.5 - 0.2 - 0.05
    assert d.interval() == pytest.approx(0.25)         # the pace never passes it
    d.applied(["log"], now=10.0)
    old, new = object(), object()
    d.stage("morphs", old, {"x": 1}, at=9.8)           # arrived late: 0.2 s old already
    d.stage("morphs", new, {"x": 2}, at=10.1)
    assert d.due(now=10.04) == []                      # never within the base interval
    assert d.due(now=10.11) == ["canvas"]              # 0.31 s old: refresh now
    assert [w for w, _, _ in d.take_overdue("morphs", now=10.11)] == [old]
    assert d.staged["morphs"] and d.since["morphs"] == {new: 10.1}


def _simulate_pacing(d, *, seconds, costs, delivery_lag, per_frame, rng):
    """Drive ``d`` like the controller does, on a fake clock: events staged on a
    plain region and a prepared one (composed ``per_frame`` a frame, marked on the
    canvas), a refresh frame costing ``costs()``. Returns the worst staleness seen,
    measured here per change (event time -> end of the frame that showed it)."""
    now, period = 0.0, 1 / 60
    d.clock = lambda: now
    widgets = {"morphs": [object() for _ in range(200)], "log": [object() for _ in range(20)]}
    staged_at: dict = {}          # widget -> first event time not yet shown
    shown_in_next_frame: list[float] = []
    worst = 0.0
    composed_since: list[float] = []
    while now < seconds:
        for _ in range(rng.randint(0, 30)):             # ~1,000 events/s
            region = "morphs" if rng.random() < 0.7 else "log"
            w = rng.choice(widgets[region])
            at = now - rng.uniform(0, delivery_lag)
            d.stage(region, w, {"v": at}, at)
            staged_at.setdefault((region, w), at)
        due = d.due()
        if due:
            if "canvas" in due:
                for w, _props, since in d.take_overdue("morphs"):
                    composed_since.append(staged_at.pop(("morphs", w)))
                    d.mark("canvas", since)
            shown = list(composed_since)
            composed_since.clear()
            for region in due:
                for w, _props in d.take(region):
                    shown.append(staged_at.pop((region, w)))
            d.applied(due)
            cost = costs()
            now += cost
            d.drawn(cost)
            worst = max([worst] + [now - t for t in shown])
        else:
            for _ in range(per_frame):
                item = d.take_one("morphs")
                if item is None:
                    break
                composed_since.append(staged_at.pop(("morphs", item[0])))
                d.mark("canvas", item[2])
            now += period
    return worst


def test_display_pacing_bounds_staleness_by_construction():
    """No timing assertion: a fake clock, frames costing 60-180 ms, events arriving
    up to 40 ms late, and pictures composed too slowly for the events (2 a frame):
    every change is on screen within the 0.5 s budget. Without the deadline (a plain
    0.3 s pace) or without composing overdue pictures at the refresh, it is not."""
    import random
    from a4ps.ui.refresh import DisplayRefresh

    def run(**kw):
        rng = random.Random(7)
        d = DisplayRefresh(("canvas", "log"), interval=0.1, max_interval=0.3,
                           prepared={"morphs": "canvas"}, budget_s=0.5, lead_s=0.05, **kw)
        d.drawn(0.18, wall=0.0)                         # a first slow frame was seen
        worst = _simulate_pacing(d, seconds=30, costs=lambda: rng.uniform(0.06, 0.18),
                                 delivery_lag=0.04, per_frame=2, rng=rng)
        return worst, d
    worst, d = run()
    assert worst <= 0.5, worst
    assert d.max_staleness_s <= 0.5 and d.forced > 0

    class NoDeadline(DisplayRefresh):                   # the old pacing, for contrast
        def deadline_age(self):
            return 10.0

    class NoOverdue(DisplayRefresh):                    # pictures only at frame budget
        def take_overdue(self, region, now=None):
            return []
    for broken in (NoDeadline, NoOverdue):
        rng = random.Random(7)
        d = broken(("canvas", "log"), interval=0.1, max_interval=0.3,
                   prepared={"morphs": "canvas"})
        d.drawn(0.18, wall=0.0)
        worst = _simulate_pacing(d, seconds=30, costs=lambda: rng.uniform(0.06, 0.18),
                                 delivery_lag=0.04, per_frame=2, rng=rng)
        assert worst > 0.5, broken.__name__


def test_scene_repaints_only_what_shows_in_damaged_tiles():
    from a4ps.ui.damage import BACKGROUND, Scene
    sc = Scene(tile=10)
    sc.resize(40, 30)
    assert len(sc.take()) == 12                              # a new canvas: all of it
    sc.put("low", (0, 0, 30, 20), (0, 0, 30, 20))
    sc.put("top", (5, 5, 25, 15), (5, 5, 25, 15))
    tiles = sc.take()
    assert tiles == {(i, j) for i in range(3) for j in range(2)}
    plan = sc.plan({(1, 1)})            # tile (10..20, 10..20): "low" covers it whole
    assert [k for k, _ in plan] == ["low", "top"]
    assert plan[1][1] == (10, 10, 20, 15)                    # clipped to the tile
    sc.put("cover", (0, 0, 40, 30), (0, 0, 40, 30))          # on top of everything
    plan = sc.plan(sc.take())
    assert {k for k, _ in plan} == {"cover"}                 # nothing below can show
    sc.remove("cover")
    plan = sc.plan(sc.take())
    assert plan[0][0] is BACKGROUND and {"low", "top"} <= {k for k, _ in plan}
    keys = [k for k, _ in plan]
    assert keys.index("top") > max(i for i, k in enumerate(keys) if k == "low")
    sc.raise_("low")
    assert sc.order == ["top", "low"] and sc.dirty


def test_scene_damages_only_the_changed_part_of_a_new_picture_in_place():
    from a4ps.ui.damage import Scene
    sc = Scene(tile=10)
    sc.resize(100, 100)
    sc.take()
    sc.put("m", (0, 0, 60, 40), (1, 1, 59, 39))
    assert len(sc.take()) == 24                             # new: all its tiles
    sc.put("m", (0, 0, 60, 40), (1, 1, 59, 39), changed=(1, 1, 59, 19))   # its words
    assert sc.take() == {(i, j) for i in range(6) for j in range(2)}
    sc.put("m", (0, 0, 60, 40), (1, 1, 59, 39))             # all of it changed
    assert len(sc.take()) == 24
    sc.put("m", (20, 0, 80, 40), (21, 1, 79, 39), changed=(21, 1, 79, 19))  # moved
    assert len(sc.take()) == 32                             # where it was and is


def test_morph_picture_is_composed_with_its_text():
    import ui_harness  # noqa: F401  (Kivy's environment; text rendering needs it)
    from a4ps.ui import sprites
    look = sprites.Look(120, 60, (0.2, 0.2, 0.3, 1), (1, 1, 1, 1), True, 0.4,
                        "[b]BRICK[/b]", 12, "a few words", 11)
    img, fits = sprites.Composer().compose(look)
    assert img.shape == (60 + sprites.SHADOW, 120 + sprites.SHADOW, 4) and fits
    assert tuple(img[1, 1]) == (255, 255, 255, 255)          # the doubled border
    assert img[62, 2, 3] == 0 and img[62, 50, 3] == int(255 * 0.4)   # the shadow
    body = img[2:58, 2:118]
    assert (body[..., :3] > 200).any()                        # text was drawn
    long = sprites.Look(120, 40, (0.2, 0.2, 0.3, 1), (1, 1, 1, 1), False, 0.4,
                        "[b]BRICK[/b]", 12, "word " * 100, 11)
    img, fits = sprites.Composer().compose(long)
    assert not fits and img.shape[0] == 40 + sprites.SHADOW   # cut, and it says so


def test_gc_pacer_runs_full_collections_only_when_asked_and_restores_cpython():
    """A full GC (~55 ms with the UI's heap) must not start inside a display refresh:
    the pacer freezes what lives, takes automatic full collections out and runs the
    due one when the controller says a refresh is on screen."""
    import gc
    import weakref

    from a4ps.ui.gcpace import NEVER, GcPacer

    class Node:
        pass

    before = gc.get_threshold()
    pacer = GcPacer()
    pacer.start()
    try:
        assert gc.get_threshold() == (before[0], before[1], NEVER)
        assert gc.get_freeze_count() > 0                  # the long-lived heap is out
        a, b = Node(), Node()
        a.other, b.other = b, a                           # a cycle only a GC frees
        gc.collect(1)                                     # now in the oldest generation
        dead = weakref.ref(a)
        del a, b
        gc.collect(0)                                     # young collections: not it
        pacer.full_every = gc.get_count()[2] + 3
        assert not pacer.collect_due() and dead() is not None   # not due yet
        for _ in range(3):
            gc.collect(1)                                 # what CPython would count
        assert pacer.collect_due() and dead() is None and pacer.collections == 1
        assert not pacer.collect_due()                  # the count starts again
        pacer.hold()                                      # a refresh frame: none at all
        assert not gc.isenabled()
        pacer.release()
        assert gc.isenabled()
        pacer.hold()
    finally:
        pacer.stop()
    assert gc.isenabled()                                 # stopped while held: back on
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert not pacer.collect_due()                      # stopped: CPython decides


def test_gc_pacer_frees_a_frozen_cycle_that_died_at_the_next_settle():
    """settle() freezes what lives; a cycle frozen then and dropped later (a deleted
    morph's widgets) must be freed by the next settle (the next snapshot), not only
    when the app stops."""
    import gc
    import weakref

    from a4ps.ui.gcpace import GcPacer

    class Node:
        pass

    pacer = GcPacer()
    pacer.start()
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        pacer.settle()                                    # a morph built: frozen
        dead = weakref.ref(a)
        del a, b
        gc.collect()                                      # frozen: no GC sees it
        assert dead() is not None
        pacer.settle_later()                              # the next snapshot's frame:
        assert dead() is not None                         # not in that busy frame...
        assert pacer.collect_due()                        # ...but in the next quiet one
        assert dead() is None
        assert gc.get_freeze_count() > 0                  # the living are frozen again
    finally:
        pacer.stop()
