"""The built wheel carries the license: LICENSE in its dist-info, named in its metadata."""

import os
import shutil
import subprocess
import sys
import zipfile

import dualsn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_ships_the_license(tmp_path):
    # Build from a copy of what the wheel is made of, so the build leaves no build/ or
    # *.egg-info in the checkout. No build isolation and no index: offline, about 3 s. It
    # needs the installed setuptools to be >= 77 (pyproject's build requirement, PEP 639).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "dualsn"), src / "dualsn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list((tmp_path / "dist").glob("dualsn-*.whl"))
    assert len(wheels) == 1, wheels

    info = f"dualsn-{dualsn.__version__}.dist-info"
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        licenses = [n for n in names if os.path.basename(n) == "LICENSE"]
        assert licenses == [f"{info}/licenses/LICENSE"], names
        shipped = whl.read(licenses[0])
        metadata = whl.read(f"{info}/METADATA").decode().splitlines()
    with open(os.path.join(ROOT, "LICENSE"), "rb") as f:
        assert shipped == f.read()
    text = shipped.decode()
    assert text.startswith("Copyright 2026 the dualsn authors\n")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    assert "dualsn/spec.py" in names
