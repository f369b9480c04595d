"""`import dualsn` must not import a framework (proven in a clean subprocess)."""

import subprocess
import sys
import textwrap


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
