import threading

import dill
import pytest

from a4ps.events import EventBus, EventRecorder
from a4ps.proto import ProtoError, ProtoManager


@pytest.fixture
def pm():
    return ProtoManager(EventBus())


def test_delegation_clone_and_receiver_binding(pm):
    pm.create("persona", {"temperature": 0.5, "greeting": "hi"},
              methods={"hello": "def hello(self):\n    return f'{self.greeting} from {self.name}'"})
    brick = pm.clone("persona", "BRICK", greeting="greetings")
    assert brick.temperature == 0.5                 # inherited slot
    assert brick.hello() == "greetings from BRICK"  # inherited method, self = receiver
    d = brick.to_dict()
    assert d["inherited"]["temperature"] == {"value": 0.5, "from": "persona"}
    assert d["inherited_methods"]["hello"]["from"] == "persona"
    assert "def hello(self)" in d["inherited_methods"]["hello"]["source"]
    pm.update("persona", {"temperature": 0.9})
    assert brick.temperature == 0.9                 # delegation is live


def test_live_method_edit_changes_behaviour(pm):
    p = pm.create("calc", methods={"f": "def f(self, x):\n    return x + 1"})
    assert p.f(1) == 2
    pm.update("calc", methods={"f": "def f(self, x):\n    return x * 10"})
    assert p.f(2) == 20


def test_invalid_edit_leaves_proto_unchanged(pm):
    p = pm.create("calc", {"a": 1}, methods={"f": "def f(self):\n    return 1"})
    v = p.version
    with pytest.raises(ProtoError, match="syntax error"):
        pm.update("calc", {"a": 2}, methods={"f": "def f(self):\n    return ("})
    with pytest.raises(ProtoError, match="single 'def g"):
        pm.update("calc", methods={"g": "x = 1"})
    with pytest.raises(ProtoError, match="identifier"):
        pm.update("calc", {"not valid": 1})
    with pytest.raises(ProtoError, match="version"):
        pm.update("calc", {"a": 3}, expected_version=v + 5)
    assert p.a == 1 and p.f() == 1 and p.version == v


def test_versions_and_events(pm):
    rec = EventRecorder(pm._bus, "proto.changed")
    p = pm.create("x", {"a": 1})
    p.a = 2
    pm.update("x", {"b": 3})
    assert p.version == 3
    assert [e.payload["version"] for e in rec.events] == [1, 2, 3]
    assert rec.events[-1].payload["keys"] == ["b"]


def test_cycles_and_removal_are_refused(pm):
    pm.create("a")
    pm.clone("a", "b")
    with pytest.raises(ProtoError, match="cycle"):
        pm.set_parent("a", "b")
    with pytest.raises(ProtoError, match="delegate"):
        pm.remove("a")
    with pytest.raises(ProtoError, match="no proto"):
        pm.get("zzz")


def test_manager_pickles_without_its_lock(pm):
    pm.create("a", {"x": 1}, methods={"m": "def m(self):\n    return self.x"})
    pm.clone("a", "b", x=2)
    with pm._lock:  # an acquired lock must not come back acquired
        blob = dill.dumps(pm)
    pm2 = dill.loads(blob)
    assert pm2.get("b").m() == 2
    done = threading.Event()
    threading.Thread(target=lambda: (pm2.update("a", {"x": 5}), done.set())).start()
    assert done.wait(2)


def test_concurrent_updates_lose_nothing(pm):
    pm.create("counter", {"n": 0})
    lock = threading.Lock()

    def bump():
        for _ in range(200):
            with lock:  # read-modify-write is the caller's; each update itself is atomic
                pm.update("counter", {"n": pm.get("counter").n + 1})
    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pm.get("counter").n == 800
    assert pm.get("counter").version == 801
