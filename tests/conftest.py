import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # small problems run faster on one thread; benchmarks set their own

REPO = Path(__file__).resolve().parent.parent
# written by the tools that run the tests, not by the tests
TOOL_CACHES = (".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache")
_BEFORE = pytest.StashKey[set]()
_NEW = pytest.StashKey[list]()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def random_patterns(k: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=dtype)


# --- the suite leaves the working tree as it found it ------------------------------------------------------------


def _is_tool_cache(path: str) -> bool:
    return any(part in TOOL_CACHES or part.endswith(".egg-info") for part in path.rstrip("/").split("/"))


def untracked_paths(repo: Path) -> set[str] | None:
    """Untracked and ignored paths in the checkout whose top is `repo` (an ignored directory counts as
    one path: git does not look inside), less the tools' caches. Ignored paths count because
    .gitignore hides the run directories a misbehaving test would leave (diffmem-landscape-*/).
    None when git is missing or `repo` is not the top of a checkout."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        top = subprocess.run(
            [git, "rev-parse", "--show-toplevel"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        if Path(top).resolve() != repo.resolve():
            return None
        out = subprocess.run(
            [git, "status", "--porcelain", "-z", "--untracked-files=all", "--ignored=matching"],
            cwd=repo,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths, entries = set(), iter(os.fsdecode(out).split("\0"))
    for entry in entries:
        status, path = entry[:2], entry[3:]
        if status[:1] in ("R", "C"):
            next(entries, None)  # a rename or copy is followed by its source path
        if status in ("??", "!!") and not _is_tool_cache(path):
            paths.add(path)
    return paths


def pytest_sessionstart(session):
    if hasattr(session.config, "workerinput"):  # pytest-xdist: the controller checks
        return
    before = untracked_paths(REPO)
    if before is not None:
        session.config.stash[_BEFORE] = before


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    after = untracked_paths(REPO) if before is not None else None
    new = sorted(after - before) if after is not None else []
    if new:
        session.config.stash[_NEW] = new
        if exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    new = config.stash.get(_NEW, [])
    if new:
        terminalreporter.section("files left in the working tree", sep="=", red=True, bold=True)
        terminalreporter.write_line(
            f"the test session created {len(new)} path(s) in {REPO}; a test must write under tmp_path "
            "(or monkeypatch.chdir(tmp_path) before a command that writes into the current directory):"
        )
        for path in new:
            terminalreporter.write_line(f"  {path}")
