import threading

from a4ps.events import EventBus, EventRecorder


def test_topic_and_wildcard_delivery():
    bus = EventBus()
    got, every = [], []
    bus.subscribe("task.step", lambda e: got.append(e.payload["n"]))
    bus.subscribe("*", lambda e: every.append(e.topic))
    bus.publish("task.step", {"n": 1})
    bus.publish("log", {"message": "x"})
    assert got == [1]
    assert every == ["task.step", "log"]


def test_failing_subscriber_is_isolated(caplog):
    bus = EventBus()
    seen = []

    def broken(e):
        raise RuntimeError("boom")
    bus.subscribe("x", broken)
    bus.subscribe("x", lambda e: seen.append(e.seq))
    ev = bus.publish("x", {})
    assert seen == [ev.seq]
    assert "boom" in caplog.text


def test_unsubscribe_and_sequence_numbers():
    bus = EventBus()
    seen = []
    off = bus.subscribe("x", lambda e: seen.append(e.seq))
    a = bus.publish("x")
    off()
    b = bus.publish("x")
    assert seen == [a.seq] and b.seq == a.seq + 1


def test_concurrent_publishers_lose_nothing():
    bus = EventBus()
    rec = EventRecorder(bus, "n")

    def work(k):
        for i in range(500):
            bus.publish("n", {"k": k, "i": i})
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [e.seq for e in rec.events]
    assert len(seqs) == 2000 and len(set(seqs)) == 2000
