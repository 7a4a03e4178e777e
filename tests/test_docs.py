"""The documentation site builds strictly (a broken link, anchor or docstring fails), and every public
name of the package has a docstring for its API reference."""

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys

import loop_trl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_docs_site_builds_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    reference = (tmp_path / "site" / "api" / "parts" / "index.html").read_text()
    for name in ("RolloutCollector", "advantages_across_processes", "PPOUpdate", "TrainerCheckpoints", "CallbackList"):
        assert name in reference
    assert "frac_reward_zero_std" in (tmp_path / "site" / "algorithm" / "index.html").read_text()


def public_objects():
    for info in pkgutil.walk_packages(loop_trl.__path__, "loop_trl."):
        if ".testbeds." in info.name:  # the testbed's own scripts, documented in docs/shapes.md
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            yield f"{info.name}.{name}", getattr(module, name)


def test_every_public_class_and_function_has_a_docstring():
    missing = [name for name, obj in public_objects()
               if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip()]
    assert not missing, missing
    assert len(list(public_objects())) > 60  # the walk found the package
