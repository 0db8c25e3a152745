"""The installed-version check at import, and the lock file's validation (scripts/deps.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt2_accel.versions import untested_versions

ROOT = Path(__file__).resolve().parents[1]
REQS = ["transformers<6,>=4.56", "torch<2.15,>=2.13", 'deepspeed>=0.15; extra == "deepspeed"']


def test_versions_inside_the_ranges_say_nothing():
    assert untested_versions(REQS, {"transformers": "5.24.0", "torch": "2.13.0+cpu", "deepspeed": None}) == []


def test_each_version_outside_its_range_is_named_with_the_range():
    msgs = untested_versions(REQS, {"transformers": "6.1.0", "torch": "2.12.1", "deepspeed": "0.14.0"})
    assert len(msgs) == 3
    assert msgs[0].startswith("transformers 6.1.0 is installed, but gpt2_accel is tested with transformers")
    assert "<6" in msgs[0] and ">=4.56" in msgs[0]
    assert "torch 2.12.1" in msgs[1] and "deepspeed 0.14.0" in msgs[2]  # an installed extra is checked too


def test_import_warns_once_and_never_fails_with_an_untested_version():
    # A fresh interpreter where the metadata reports a transformers release beyond the tested range.
    code = textwrap.dedent(
        """
        import importlib.metadata as m, warnings
        real = m.version
        m.version = lambda name: "99.0.0" if name == "transformers" else real(name)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            import gpt2_accel
        ours = [str(w.message) for w in seen if type(w.message).__name__ == "UntestedVersionWarning"]
        print(len(ours))
        print(ours[0] if ours else "")
        """
    )
    try:
        import importlib.metadata as m

        m.requires("gpt2_accel")
    except m.PackageNotFoundError:
        pytest.skip("gpt2_accel is not installed (no package metadata to read the ranges from)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, message = out.stdout.strip().splitlines()
    assert count == "1" and message.startswith("transformers 99.0.0 is installed") and "<6" in message


def _deps(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "deps.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_the_shipped_lock_is_valid_and_pins_what_the_setup_installs():
    proc = _deps("check", str(ROOT / "constraints.txt"))
    assert proc.returncode == 0, proc.stderr
    lock = (ROOT / "constraints.txt").read_text()
    assert "--index-url" not in lock and "--extra-index-url" not in lock and "-f " not in lock
    assert _deps("torch", str(ROOT / "constraints.txt")).stdout.strip().startswith("torch==2.")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("torch==2.13.0\ntransformers>=5\n", "is not a `name==version` pin"),
        (
            "--index-url https://example.org/simple\ntorch==2.13.0\ntransformers==5.24.0\n",
            "an option or index URL",
        ),
        ("torch==2.13.0\ntorch==2.13.0\ntransformers==5.24.0\n", "pinned twice"),
        ("accelerate==1.15.0\n", "partial or truncated"),
    ],
)
def test_a_damaged_lock_is_refused_naming_the_line_and_the_fix(tmp_path, content, message):
    lock = tmp_path / "constraints.txt"
    lock.write_text(content)
    proc = _deps("check", str(lock))
    assert proc.returncode == 1 and message in proc.stderr and "scripts/lock.sh" in proc.stderr


def test_a_bad_refresh_keeps_the_old_lock(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("torch==2.13.0\ntransformers==5.24.0\n")
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("accelerate==1.15.0\n")  # no torch: a truncated environment
    proc = _deps("write", str(freeze), str(lock))
    assert proc.returncode == 1 and lock.read_text() == "torch==2.13.0\ntransformers==5.24.0\n"
    assert list(tmp_path.iterdir()) == [freeze, lock] or sorted(tmp_path.iterdir()) == sorted([freeze, lock])
    freeze.write_text("torch==2.14.1+cpu\ntransformers==5.25.0\n-e /work/gpt2_accel\nuv==0.13.9\n")
    assert _deps("write", str(freeze), str(lock)).returncode == 0
    pins = [x for x in lock.read_text().splitlines() if not x.startswith("#")]
    assert pins == ["torch==2.14.1", "transformers==5.25.0"]
