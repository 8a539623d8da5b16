"""A decision's schema is an object schema: ``ModelManager.structured`` promises a dict
(the tool request, the judge and the votes read keys from it). Found by mypy --strict:
a top-level string/enum schema passed check_schema and came back as a bare value."""
from __future__ import annotations

import pytest

from a4ps.models.embeddings import HashEmbedder
from a4ps.models.errors import InvalidRequest
from a4ps.models.manager import ModelManager
from a4ps.models.scripted import ScriptedBackend


def _manager(settings, bus, replies):
    return ModelManager(settings, bus, backend=ScriptedBackend(replies=replies),
                        embedder=HashEmbedder())


@pytest.mark.parametrize("schema", [{"type": "string"}, {"enum": ["a", "b"]},
                                    {"type": "array", "items": {"type": "string"}}])
def test_a_non_object_decision_schema_is_refused_before_asking(settings, bus, schema):
    mm = _manager(settings, bus, ['"a"', '["a"]'])
    with pytest.raises(InvalidRequest, match="must be an object schema"):
        mm.structured("a", "pick one", schema)
    assert mm.resident() is None              # refused before any model was loaded


def test_an_object_decision_comes_back_as_the_validated_dict(settings, bus):
    mm = _manager(settings, bus, ['{"name": "add"}'])
    out = mm.structured("a", "which tool?", {"type": "object",
                                             "properties": {"name": {"type": "string"}},
                                             "required": ["name"]})
    assert out == {"name": "add"}
