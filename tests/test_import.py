"""`import dualsn` must not import a framework, and a backend without its framework names the
extra to install (both proven in clean subprocesses)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest


def test_import_dualsn_imports_no_framework():
    code = textwrap.dedent(
        """
        import sys
        import dualsn, dualsn.spec
        dualsn.manual_seed(0)
        dualsn.manual_seed(None)
        loaded = sorted(m for m in ("torch", "paddle") if m in sys.modules)
        print(",".join(loaded) or "none")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "none"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "backend, framework, other",
    [("dualsn.paddle", "paddle", "dualsn.torch"), ("dualsn.torch", "torch", "dualsn.paddle")],
)
def test_backend_without_its_framework_names_the_extra(backend, framework, other):
    """With the framework missing, importing its backend raises ModuleNotFoundError (an
    ImportError) that says which extra to install; the other backend still imports."""
    code = textwrap.dedent(
        f"""
        import importlib, json, sys
        sys.modules[{framework!r}] = None  # import {framework} now raises ModuleNotFoundError
        try:
            importlib.import_module({backend!r})
        except ImportError as e:
            cause = e.__cause__
            result = dict(type=type(e).__name__, message=str(e), name=e.name,
                          cause=type(cause).__name__, cause_name=getattr(cause, "name", None))
        else:
            result = dict(type=None)
        importlib.import_module({other!r})
        result["loaded"] = sorted(m for m in ("torch", "paddle") if sys.modules.get(m) is not None)
        print(json.dumps(result))
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["type"] == "ModuleNotFoundError"
    assert f'pip install "dualsn[{framework}]"' in result["message"]
    assert result["name"] == framework
    assert (result["cause"], result["cause_name"]) == ("ModuleNotFoundError", framework)
    assert result["loaded"] == [{"paddle": "torch", "torch": "paddle"}[framework]]
