"""UI frame rate with 200 morphs on the canvas while events arrive over real ZeroMQ.

A publisher thread sends daemon-shaped events (task.step for random morphs, log,
model.loading, heartbeat) on a PUB socket at a fixed rate; the app reads them with the
real EventSubscriber through its Clock-driven bounded poll and updates the widgets.
Frames are counted over a window of seconds with Kivy's frame cap at 60 fps.

    .venv/bin/python bench/bench_ui.py            # re-runs itself under xvfb-run if no DISPLAY
    .venv/bin/python bench/bench_ui.py --seconds 5 --morphs 200 --rates 0,1000,5000
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--morphs", type=int, default=200)
    ap.add_argument("--rates", default="0,1000,5000", help="events/s, comma-separated")
    ap.add_argument("--no-xvfb", action="store_true", help="don't re-run under xvfb-run")
    args = ap.parse_args()
    if not os.environ.get("DISPLAY") and not args.no_xvfb and shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1280x800x24", sys.executable,
               *sys.argv, "--no-xvfb"]
        return subprocess.call(cmd)
    os.environ.setdefault("A4PS_UI_SCREENSHOTS", str(Path("/tmp") / "a4ps-bench-ui"))
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import ui_harness
    from kivy.config import Config
    Config.set("graphics", "maxfps", "60")

    import zmq
    from a4ps.client import EventSubscriber
    from a4ps.protocol import encode_event
    from a4ps.ui.app import MorphicApp

    port = ui_harness.free_port()
    addr = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.bind(addr)

    h = ui_harness.harness()
    app = h.start(MorphicApp(runner=None,
                             subscriber_factory=lambda: EventSubscriber(addr, context=ctx),
                             poll_hz=60, max_events_per_tick=500))
    c = app.controller
    names = [f"P{i:03d}" for i in range(args.morphs)]
    rng0 = random.Random(0)
    for i, name in enumerate(names):   # full-size morphs, overlapping as on a crowded desk
        c.apply_proto({"name": name, "version": 1, "slots": {   # 3 share a model, as personas do
            "role": "bench", "model_name": "m" if i < 3 else f"m{i}", "status": "idle",
            "morph_pos": [rng0.uniform(0, 540), rng0.uniform(0, 640)]}})
    h.pump(10)
    # steady state: the log panel starts full (500 lines). While it first fills, the
    # growing RecycleView costs ~8 extra redraws/s (35-39 fps measured at 1000 ev/s).
    for i in range(500):
        c.add_log("info", f"earlier line {i}")
    h.pump_for(1.0)
    time.sleep(0.3)   # SUB connects

    draws = [0]
    h.window.bind(on_draw=lambda *_: draws.__setitem__(0, draws[0] + 1))
    rows = []
    seq = [0]
    for rate in [int(r) for r in args.rates.split(",") if r.strip()]:
        stop = threading.Event()
        sent = [0]

        def publish():
            rng = random.Random(1)
            t0 = time.perf_counter()
            while not stop.is_set():
                due = int((time.perf_counter() - t0) * rate)
                while sent[0] < due:
                    seq[0] += 1
                    k = sent[0] % 10
                    if k < 7:
                        topic, payload = "task.step", {
                            "task_id": "bench", "node": "brick",
                            "persona": rng.choice(names), "round": 1 + sent[0] % 3,
                            "text": f"utterance {sent[0]}", "dissonance": rng.random()}
                    elif k < 9:
                        topic, payload = "log", {"level": "info", "message": f"log {sent[0]}"}
                    else:
                        topic, payload = "model.loading", {"model": "m",
                                                           "progress": (sent[0] % 100) / 100}
                    pub.send_multipart(encode_event(topic, seq[0], time.time(), payload))
                    sent[0] += 1
                time.sleep(0.001)

        thread = threading.Thread(target=publish, daemon=True) if rate else None
        handled0 = c.events_seen
        if thread:
            thread.start()
        h.pump_for(0.5)  # warm up
        handled1, t0 = c.events_seen, time.perf_counter()
        refreshes0 = c.refreshes
        draws0 = draws[0]
        sent0 = sent[0]
        worst = 0.0
        frames = 0
        last = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            h.event_loop.idle()     # one frame: input, clock (the UI's poll), draw if dirty
            frames += 1
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now
        elapsed = time.perf_counter() - t0
        redraws = draws[0] - draws0
        handled = c.events_seen - handled1
        stop.set()
        if thread:
            thread.join()
        # bring the transcript back to a bounded size between runs
        c.tasks.clear()
        rows.append((rate, (sent[0] - sent0) / elapsed, handled / elapsed, frames / elapsed,
                     redraws / elapsed, (c.refreshes - refreshes0) / elapsed,
                     1.0 / worst if worst else 0.0))
        h.pump_for(0.3)
        del handled0
    shot = h.screenshot("bench-ui")
    h.stop()
    pub.close(0)
    ctx.destroy(0)

    from kivy.core.gl import GL_RENDERER, glGetString
    renderer = glGetString(GL_RENDERER)
    renderer = renderer.decode() if isinstance(renderer, bytes) else str(renderer)
    print(f"\nUI frame rate, {args.morphs} morphs, {args.seconds:g}s per row, frame cap 60 fps, "
          f"display {os.environ.get('DISPLAY') or os.environ.get('SDL_VIDEODRIVER')}, "
          f"GL {renderer}")
    print(f"{'offered ev/s':>13} {'sent ev/s':>10} {'handled ev/s':>13} {'frames/s':>9} "
          f"{'redraws/s':>10} {'refreshes/s':>12} {'worst-frame fps':>16}")
    for rate, sent_s, handled_s, fps, rd, rf, worst_fps in rows:
        print(f"{rate:>13} {sent_s:>10.0f} {handled_s:>13.0f} {fps:>9.1f} {rd:>10.1f} "
              f"{rf:>12.1f} {worst_fps:>16.1f}")
    print("frames/s: event-loop frames (input, clock, events handled); redraws/s: frames "
          "that repainted the window;\nrefreshes/s: batched display updates (morphs, status "
          "bar, log); worst-frame fps: 1 / the longest frame.")
    print(f"screenshot: {shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
