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


# -- issue 13: live edits that cannot wedge or poison the system ----------------------

import pickle  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from a4ps.proto import (MethodFaulted, MethodTimeout, MethodWatchdog,  # noqa: E402
                        check_slot_value, compile_method)


def state_bytes(pm: ProtoManager) -> bytes:
    """Everything a refused change must leave as it was: the image state (slots,
    methods, versions, history, faults) and every proto's version."""
    return pickle.dumps((pm.image_state(), [(p.name, p.version) for p in pm]))


def persona_graph(pm: ProtoManager) -> None:
    pm.create("persona", {"temperature": 0.7, "status": "idle"},
              methods={"invoke_llm": "def invoke_llm(self, prompt, **kw):\n    return 'ok'\n"})
    for name, role in (("ALFRED", "steward"), ("BRICK", "logician"), ("ROBIN", "empath")):
        pm.clone("persona", name, role=role, model_name="m1", system_prompt=f"You are {name}.")


def test_checking_a_method_runs_none_of_its_code(pm, tmp_path):
    """Failure 5: compile_method executed decorators and defaults before any check."""
    marker = tmp_path / "ran"
    pm.create("calc", methods={"f": "def f(self):\n    return 1\n"})
    before = state_bytes(pm)
    hostile = {
        "decorator": f"@__import__('pathlib').Path({str(marker)!r}).touch\n"
                     "def f(self):\n    return 2\n",
        "default": f"def f(self, x=__import__('pathlib').Path({str(marker)!r}).touch()):\n"
                   "    return 2\n",
        "kw default": f"def f(self, *, x=open({str(marker)!r}, 'w')):\n    return 2\n",
        "sleeping default": "def f(self, x=__import__('time').sleep(30)):\n    return 2\n",
        "two statements": f"open({str(marker)!r}, 'w')\ndef f(self):\n    return 2\n",
        "class": "class f:\n    pass\n",
        "async": "async def f(self):\n    return 2\n",
        "no self": "def f(x):\n    return 2\n",
    }
    for why, src in hostile.items():
        t0 = time.monotonic()
        with pytest.raises(ProtoError):
            pm.update("calc", methods={"f": src})
        assert time.monotonic() - t0 < 1, why         # nothing slept
        assert not marker.exists(), why                # nothing ran
        assert state_bytes(pm) == before, why          # nothing changed
    # annotations are kept as text, never evaluated
    pm.update("calc", methods={"f": f"def f(self, x: open({str(marker)!r}, 'w') = 1) -> "
                                    "__import__('os').getcwd():\n    return x + 1\n"})
    assert not marker.exists() and pm.get("calc").f() == 2
    # literal defaults are fine
    f = compile_method("g", "def g(self, a=1, b=-2.5, c=(1, 'x'), *, d={'k': [None]}):\n"
                            "    return a, b, c, d\n")
    assert f(None) == (1, -2.5, (1, "x"), {"k": [None]})


def test_slot_values_are_checked_for_depth_and_size(pm):
    """Failure 7: a 1 KB value nested 500 deep was applied and broke every save."""
    pm.create("x", {"a": 1})
    before = state_bytes(pm)
    deep: list = []
    node = deep
    for _ in range(500):
        node.append([])
        node = node[0]
    cyclic: list = []
    cyclic.append(cyclic)
    too_big = "x" * (pm.max_slot_bytes + 1)
    wide = {f"k{i}": i for i in range(100_000)}
    for value in (deep, cyclic, too_big, wide, [too_big[:1000]] * 1000):
        with pytest.raises(ProtoError, match="nested deeper|larger than"):
            pm.update("x", {"b": value})
        assert state_bytes(pm) == before
    with pytest.raises(ProtoError):
        pm.create("y", {"deep": deep})
    assert "y" not in pm
    # under the limits: applied, and the image state still pickles
    ok = [[[{"k": list(range(50))}]]]
    pm.update("x", {"b": ok, "c": "y" * 10_000})
    pickle.dumps(pm.image_state())
    assert check_slot_value("v", ok) < pm.max_slot_bytes


def test_persona_schema_types_and_essential_slots(pm):
    """Failure 8: essential slots could be deleted or set to nonsense."""
    persona_graph(pm)
    before = state_bytes(pm)
    refused = [
        ("ROBIN", {}, ["role"]),                            # delete essential
        ("ROBIN", {}, ["model_name"]),
        ("ROBIN", {}, ["system_prompt"]),
        ("persona", {}, ["temperature"]),                   # every persona inherits it
        ("ROBIN", {"model_name": None}, []),
        ("ROBIN", {"model_name": 42}, []),
        ("ROBIN", {"model_name": ""}, []),
        ("ROBIN", {"role": ["not", "text"]}, []),
        ("BRICK", {"temperature": "hot"}, []),
        ("BRICK", {"temperature": 7.5}, []),
        ("BRICK", {"temperature": True}, []),
        ("persona", {"temperature": -1}, []),
        ("BRICK", {"top_p": 0}, []),
        ("BRICK", {"top_p": 1.5}, []),
        ("BRICK", {"repetition_penalty": -1.0}, []),
        ("BRICK", {"no_repeat_ngram_size": 2.5}, []),
        ("BRICK", {"no_repeat_ngram_size": -1}, []),
        ("BRICK", {"stop": "END"}, []),
        ("BRICK", {"stop": ["ok", 3]}, []),
        ("BRICK", {"stop": [""]}, []),
        ("BRICK", {"stop": ["x"] * 17}, []),
        ("BRICK", {"max_tokens": 0}, []),
        ("BRICK", {"max_tokens": "100"}, []),
    ]
    for name, slots, delete in refused:
        with pytest.raises(ProtoError) as e:
            pm.update(name, slots, delete=delete)
        assert name in str(e.value), (name, slots, delete, e.value)
        assert state_bytes(pm) == before, (name, slots, delete)
    # the same keys with good values apply
    pm.update("BRICK", {"temperature": 0, "top_p": 0.9, "repetition_penalty": 1.1,
                        "no_repeat_ngram_size": 3, "stop": ["\nUser:"], "max_tokens": 128})
    pm.update("BRICK", {"temperature": 0.25})
    pm.update("BRICK", delete=["temperature"])          # falls back to the inherited 0.7
    assert pm.get("BRICK").temperature == 0.7
    # a non-persona proto keeps free slots
    pm.create("note", {"role": None, "temperature": "any"})


def test_user_edit_of_model_name_must_name_a_known_model(pm):
    from a4ps.events import EventBus as _Bus
    from a4ps.models.manager import ModelManager
    from a4ps.models.scripted import ScriptedBackend
    from a4ps.config import load_settings
    settings = load_settings()
    models = ModelManager(settings, _Bus(), backend=ScriptedBackend(models=["m1", "m2"]))
    pm.provide("models", models)
    persona_graph(pm)
    before = state_bytes(pm)
    with pytest.raises(ProtoError, match="no model 'nope'"):
        pm.update("ROBIN", {"model_name": "nope"}, origin="user")
    assert state_bytes(pm) == before
    pm.update("ROBIN", {"model_name": "m2"}, origin="user")
    assert pm.get("ROBIN").model_name == "m2"


def test_embedded_backend_refuses_unknown_models_and_missing_adapters(pm, tmp_path):
    """The real embedded backend's catalogue, without loading the model."""
    from a4ps.config import load_settings
    from a4ps.events import EventBus as _Bus
    from a4ps.models.embedded import EmbeddedBackend
    from a4ps.models.manager import ModelManager
    settings = load_settings(data_dir=tmp_path)
    pm.provide("models", ModelManager(settings, _Bus(), backend=EmbeddedBackend(settings)))
    persona_graph(pm)
    before = state_bytes(pm)
    for bad in ("llama3:70b", f"smollm2-135m+lora:{tmp_path}/no-such-adapter"):
        with pytest.raises(ProtoError, match="model_name"):
            pm.update("BRICK", {"model_name": bad}, origin="user")
        assert state_bytes(pm) == before
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    pm.update("BRICK", {"model_name": f"smollm2-135m+lora:{adapter}"}, origin="user")
    pm.update("BRICK", {"model_name": "smollm2-135m"}, origin="user")


def test_every_other_refusal_leaves_state_byte_identical(pm):
    persona_graph(pm)
    before = state_bytes(pm)
    refusals = [
        lambda: pm.update("BRICK", {"x": 1}, expected_version=999),
        lambda: pm.update("BRICK", {"_private": 1}),
        lambda: pm.update("BRICK", {"not an identifier": 1}),
        lambda: pm.update("BRICK", delete=["no_such_slot"]),
        lambda: pm.update("NOBODY", {"x": 1}),
        lambda: pm.update("BRICK", {"ok": 1}, methods={"m": "def m(self):\n    return ("}),
        lambda: pm.update("BRICK", {"ok": 1}, methods={"m": 42}),
        lambda: pm.update("BRICK", "slots"),
        lambda: pm.update("BRICK", delete="role"),
        lambda: pm.update("BRICK", {"ok": 1}, delete=[None]),
        lambda: pm.revert_method("BRICK", "invoke_llm"),      # nothing to revert to
        lambda: pm.create("BRICK"),
        lambda: pm.create("bad name!"),
        lambda: pm.create("child", parent="NOBODY"),
        lambda: pm.set_parent("persona", "BRICK"),
        lambda: pm.remove("persona"),
    ]
    for i, refuse in enumerate(refusals):
        with pytest.raises(ProtoError):
            refuse()
        assert state_bytes(pm) == before, i


def test_method_history_and_revert(pm):
    persona_graph(pm)
    pm.update("BRICK", methods={"invoke_llm": "def invoke_llm(self, p, **kw):\n    return 'v1'\n"})
    pm.update("BRICK", methods={"invoke_llm": "def invoke_llm(self, p, **kw):\n    return 'v2'\n"})
    brick = pm.get("BRICK")
    assert brick.invoke_llm("x") == "v2"
    assert brick.to_dict()["method_history"] == {"invoke_llm": 2}
    pm.revert_method("BRICK", "invoke_llm")
    assert brick.invoke_llm("x") == "v1"
    pm.revert_method("BRICK", "invoke_llm")        # BRICK had no own method before
    assert "invoke_llm" not in brick.own_methods() and brick.invoke_llm("x") == "ok"
    with pytest.raises(ProtoError, match="no earlier version"):
        pm.revert_method("BRICK", "invoke_llm")
    # the history travels in the image
    pm.update("BRICK", methods={"invoke_llm": "def invoke_llm(self, p, **kw):\n    return 'v3'\n"})
    pm2 = ProtoManager()
    pm2.restore_image(pickle.loads(pickle.dumps(pm.image_state())))
    pm2.revert_method("BRICK", "invoke_llm")
    assert pm2.get("BRICK").invoke_llm("x") == "ok"


@pytest.fixture
def watched():
    return ProtoManager(EventBus(), watchdog=MethodWatchdog(budget_s=0.5, wall_budget_s=3.0))


def test_a_looping_method_is_abandoned_faulted_and_revertable(watched):
    """Failure 6: a method that loops when called wedged its caller forever."""
    pm = watched
    persona_graph(pm)
    rec = EventRecorder(pm._bus, "proto.changed")
    pm.update("BRICK", methods={"invoke_llm": "def invoke_llm(self, p, **kw):\n"
                                              "    while True:\n        pass\n"})
    threads_before = threading.active_count()
    t0 = time.monotonic()
    with pytest.raises(MethodTimeout, match="BRICK.invoke_llm.*revert_method"):
        pm.get("BRICK").invoke_llm("hi")
    assert time.monotonic() - t0 < 3
    # the runaway thread is stopped (MethodAbandoned lands in the loop)
    deadline = time.monotonic() + 5
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before
    # faulted: the next call fails at once, and says why
    t0 = time.monotonic()
    with pytest.raises(MethodFaulted, match="abandoned"):
        pm.get("BRICK").invoke_llm("hi")
    assert time.monotonic() - t0 < 0.2
    assert "invoke_llm" in pm.get("BRICK").to_dict()["method_faults"]
    assert any(e.payload["name"] == "BRICK" for e in rec.events)
    # other personas are unaffected; the inspector can revert
    assert pm.get("ROBIN").invoke_llm("hi") == "ok"
    pm.revert_method("BRICK", "invoke_llm")
    assert pm.get("BRICK").invoke_llm("hi") == "ok"
    assert pm.get("BRICK").to_dict()["method_faults"] == {}


def test_time_inside_services_is_not_the_methods_own(watched):
    pm = watched

    class SlowModels:
        def chat(self, *_a, **_k):
            time.sleep(1.0)          # twice the method budget, in a service call
            return "slow but fine"
    pm.provide("models", SlowModels())
    persona_graph(pm)
    pm.update("BRICK", methods={"invoke_llm": "def invoke_llm(self, p, **kw):\n"
                                              "    return self.service('models').chat(p)\n"})
    assert pm.get("BRICK").invoke_llm("x") == "slow but fine"
    # ... but the wall budget still bounds a call stuck in a service
    pm.watchdog.wall_budget_s = 0.6
    with pytest.raises(MethodTimeout, match="in all"):
        pm.get("BRICK").invoke_llm("x")


def test_errors_and_nested_calls_pass_through_the_watchdog(watched):
    pm = watched
    pm.create("calc", methods={
        "boom": "def boom(self):\n    raise KeyError('nope')\n",
        "twice": "def twice(self, x):\n    return self.add(x, x)\n",
        "add": "def add(self, a, b):\n    return a + b\n"})
    with pytest.raises(KeyError, match="nope"):
        pm.get("calc").boom()
    assert pm.get("calc").twice(21) == 42
    assert pm.watchdog.status()["calls"] == 2       # the nested call ran inline


def test_a_looping_inherited_method_is_faulted_on_its_owner(watched):
    pm = watched
    persona_graph(pm)
    pm.update("persona", methods={"invoke_llm": "def invoke_llm(self, p, **kw):\n"
                                                "    while True:\n        pass\n"})
    with pytest.raises(MethodTimeout, match="persona.invoke_llm.*name 'persona'"):
        pm.get("BRICK").invoke_llm("hi")             # BRICK inherits the loop
    for name in ("ALFRED", "BRICK", "ROBIN"):        # every heir fails at once now
        with pytest.raises(MethodFaulted, match="persona.invoke_llm"):
            pm.get(name).invoke_llm("hi")
    assert "invoke_llm" in pm.get("persona").faults()
    pm.revert_method("persona", "invoke_llm")
    assert pm.get("ROBIN").invoke_llm("hi") == "ok"
    # re-saving the same source adds no history entry
    src = pm.get("persona").own_methods()["invoke_llm"]
    pm.update("persona", methods={"invoke_llm": src})
    assert "invoke_llm" not in pm.get("persona").to_dict()["method_history"]
