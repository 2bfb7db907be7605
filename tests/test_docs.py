"""The documentation: the site builds strictly, the API reference holds every public name, every
repository path that README.md and docs/ name exists in the repository, and every Python snippet runs.

A ```python block whose first line is a comment starting with "# needs:" (a GPU, a distributed launch,
a model of your own, ...) is not run; every other block runs as it stands, in a fresh namespace.
Needs the `docs` extra (mkdocs and its plugins: `pip install -e ".[docs]"`).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lco_kernels

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
NEEDS = "# needs:"

pytestmark = pytest.mark.docs


def _tracked():
    """The repository's files: git's index when this is a clone, else the files on disk."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return {p for p in out.decode().split("\0") if p}
    except (OSError, subprocess.CalledProcessError):
        return {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()}


def _snippets():
    """(page, line, code) of every ```python block of README.md and docs/."""
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").split("\n")
        k = 0
        while k < len(lines):
            if lines[k].strip() == "```python":
                end = next(j for j in range(k + 1, len(lines)) if lines[j].strip() == "```")
                found.append((page.relative_to(ROOT).as_posix(), k + 1, "\n".join(lines[k + 1:end])))
                k = end
            k += 1
    return found


SNIPPETS = _snippets()
RUNNABLE = [s for s in SNIPPETS if not s[2].lstrip().startswith(NEEDS)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


def test_api_reference_has_every_public_name(site):
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in lco_kernels.__all__ if f'id="lco_kernels.{name}"' not in html]
    assert not missing, f"not in the built API reference: {missing}"


# a repository path: a top-level folder of the project, then path characters; or a top-level file
PATH = re.compile(r"(?<![\w./-])((?:bench|docs|lco_kernels|reference|tests|\.ci)/[\w./-]*[\w/]"
                  r"|(?:setup\.py|mkdocs\.yml|pytest\.ini|README\.md))(::\w+)?")


def test_every_repository_path_named_exists():
    tracked = _tracked()
    folders = {"/".join(p.split("/")[:k]) for p in tracked for k in range(1, p.count("/") + 1)}
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in PATH.finditer(text):
            path, test = match.group(1).rstrip("/"), match.group(2)
            if path not in tracked and path not in folders:
                missing.append(f"{page.relative_to(ROOT)}: {path}")
            elif test and f"def {test[2:]}(" not in (ROOT / path).read_text(encoding="utf-8"):
                missing.append(f"{page.relative_to(ROOT)}: {path}{test}")
    assert not missing, "named in the documentation but not in the repository:\n" + "\n".join(missing)


def test_every_benchmark_record_cited_is_committed():
    cited = {m.group(1).rstrip("/") for page in PAGES
             for m in re.finditer(r"(bench/results/[\w.-]+)", page.read_text(encoding="utf-8"))}
    assert cited, "the documentation cites no benchmark record"
    tracked = _tracked()
    assert not [c for c in cited if not any(p.startswith(c + "/") for p in tracked)]


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets
    assert not [t for t in targets if not (ROOT / t).exists()]


def test_snippets_marked_not_run_say_why():
    """Only blocks that truly need more than this machine are left out, and each says what it needs."""
    for page, line, code in SNIPPETS:
        if code.lstrip().startswith(NEEDS):
            assert len(code.lstrip()[len(NEEDS):].split("\n")[0].strip()) > 5, f"{page}:{line}"


@pytest.mark.parametrize("page,line,code", RUNNABLE, ids=[f"{p}:{n}" for p, n, _ in RUNNABLE])
def test_snippet_runs(page, line, code):
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__main__"})
