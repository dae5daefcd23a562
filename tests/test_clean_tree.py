"""The check in conftest.py that the test suite leaves no files in the working tree."""

import shutil
import subprocess

import pytest

from conftest import untracked_paths

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("out-*/\n__pycache__/\n")
    (tmp_path / "tracked.txt").write_text("x\n")
    _git(tmp_path, "add", ".gitignore", "tracked.txt")
    return tmp_path


def test_a_new_file_is_flagged_also_when_gitignore_hides_it(repo):
    before = untracked_paths(repo)
    assert before == set()
    (repo / "stray.csv").write_text("a\n")
    (repo / "out-00001").mkdir()
    (repo / "out-00001" / "landscape.json").write_text("{}")  # ignored: the directory is reported
    (repo / "tracked.txt").write_text("changed\n")  # a modified tracked file is not a new path
    assert sorted(untracked_paths(repo) - before) == ["out-00001/", "stray.csv"]


def test_tool_caches_are_not_flagged(repo):
    for cache in ("__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", ".venv", "pkg.egg-info"):
        (repo / "sub" / cache).mkdir(parents=True)
        (repo / "sub" / cache / "f").write_text("")
    assert untracked_paths(repo) == set()


def test_no_check_outside_a_checkout(tmp_path):
    (tmp_path / "plain").mkdir()
    assert untracked_paths(tmp_path / "plain") is None
