"""The static gate: forbidden imports and calls are refused with a message naming them."""
from __future__ import annotations

import pytest

from a4ps.tools.static_gate import GateError, check, enforce

ALLOWED = ["math", "statistics", "datetime", "json", "collections"]


def test_clean_code_passes():
    src = (
        "import math\nimport statistics as st\nfrom datetime import date, timedelta\n"
        "from collections import Counter\n\n"
        "def f(values, input=None):\n"
        "    '''doc'''\n"
        "    c = Counter(values)\n"
        "    return {'mean': st.mean(values), 'sqrt': math.sqrt(len(values)), 'n': c.most_common(1),\n"
        "            'd': (date(2024, 1, 1) + timedelta(days=3)).isoformat(), 'g': getattr(c, 'total')()}\n"
        "if __name__ == '__main__':\n    print(f([1, 2]))\n"
    )
    assert check(src, ALLOWED) == []


@pytest.mark.parametrize("src, named", [
    ("import os", "'os'"),
    ("import subprocess as sp", "'subprocess'"),
    ("from socket import socket", "'socket'"),
    ("import os.path", "'os.path'"),
    ("import importlib", "'importlib'"),
    ("from . import sibling", "relative imports"),
    ("from math import __loader__", "'__loader__'"),
    ("eval('1+1')", "eval()"),
    ("exec('x = 1')", "exec()"),
    ("compile('1', 'f', 'eval')", "compile()"),
    ("__import__('os')", "__import__()"),
    ("f = eval", "'eval'"),
    ("g = globals()", "globals()"),
    ("().__class__.__bases__", "'__class__'"),
    ("x = __builtins__", "'__builtins__'"),
    ("getattr(object, '__subclasses__')", "'__subclasses__'"),
    ("getattr(object, name)", "computed attribute name"),
    ("setattr(object, 'a', 1)", "setattr()"),
    ("open('/etc/passwd')", "'/etc/passwd'"),
    ("open('../../secrets.txt')", "'../../secrets.txt'"),
    ("open('~/.ssh/id_rsa')", "'~/.ssh/id_rsa'"),
    ("open(path)", "computed path"),
    ("breakpoint()", "breakpoint()"),
])
def test_forbidden_imports_and_calls_are_named(src, named):
    violations = check(src, ALLOWED)
    assert violations, src
    assert any(named in v for v in violations), violations
    assert violations[0].startswith("line 1:")


def test_every_violation_is_listed_with_its_line():
    src = "import math\nimport os\nx = eval('2')\ny = open('data.txt').read()\nz = x.__dict__\n"
    v = check(src, ALLOWED)
    assert len(v) == 3
    assert v[0].startswith("line 2:") and "'os'" in v[0]
    assert v[1].startswith("line 3:") and "eval()" in v[1]
    assert v[2].startswith("line 5:") and "'__dict__'" in v[2]


def test_syntax_errors_are_reported_not_raised():
    assert check("def f(:\n  pass", ALLOWED) == ["syntax error at line 1: invalid syntax"]


def test_enforce_raises_gate_error_with_the_violations():
    with pytest.raises(GateError) as err:
        enforce("import shutil\nshutil.rmtree('/')", ALLOWED, what="tool 'cleaner'")
    assert err.value.violations and "'shutil'" in err.value.violations[0]
    assert "tool 'cleaner' refused by the static gate" in str(err.value)
    enforce("import math", ALLOWED)   # no error


def test_submodules_of_allowed_modules_pass_and_the_allowlist_is_the_argument():
    assert check("import os.path", ["os"]) == []
    assert check("import json.decoder", ALLOWED) == []
    assert check("import math", []) and "not allowed" in check("import math", [])[0]
