"""The repository describes itself: every reference to the method resolves to a heading of
docs/method.md, and no file points outside the repository (a spec that is not shipped, the data
or virtual environments of a development machine)."""

import os
import re

import pytest
from conftest import REPO

METHOD = REPO / "docs" / "method.md"
SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "build",
    "dist",
    "runs",
    "workdirs",
    ".gpu",
    ".whl",
    ".site",
    "node_modules",
}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".csv"}

METHOD_REF = re.compile(r"docs/method\.md#([\w-]+)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]*method\.md)(?:#([\w-]+))?\)")
# Written so that this file does not match itself.
SPEC_FILE = re.compile("ALGORITHMS" + r"\.md")
SECTION_SIGN = "\N{SECTION SIGN}"
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:wor" + r"k|roo" + r"t)/")
SHARED = "../" + "shared"
# Where the default data location beside the checkout may be named: the test fixture that uses
# it, CI, and README where it documents that default.
SHARED_ALLOWED = {"tests/conftest.py", ".ci/run"}


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    """The anchors of a Markdown file's headings (fenced code skipped, repeats numbered)."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = re.match(r"#{1,6} +(.*?)#*\s*$", line)
        if in_code or not match:
            continue
        slug = github_slug(match.group(1))
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def repository_files():
    """(relative path, text) of every text file of the repository, docs/method.md included."""
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")
        )
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            suffix = os.path.splitext(name)[1]
            if suffix not in TEXT_SUFFIXES and not (suffix == "" and _has_shebang(path)):
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                yield os.path.relpath(path, REPO).replace(os.sep, "/"), f.read()


def _has_shebang(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


@pytest.fixture(scope="module")
def files():
    return dict(repository_files())


@pytest.fixture(scope="module")
def anchors():
    return heading_anchors(METHOD.read_text(encoding="utf-8"))


def test_github_slugs():
    assert github_slug("Memory smoothing, again!") == "memory-smoothing-again"
    assert github_slug("WRN-28-2") == "wrn-28-2"
    assert github_slug("SGD and weight decay") == "sgd-and-weight-decay"
    assert github_slug("`x`, the labelled view") == "x-the-labelled-view"
    assert heading_anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def test_method_documents_every_quirk(anchors):
    for n in range(1, 18):
        assert any(a.startswith(f"q{n}-") for a in anchors), f"no heading for quirk Q{n}"


def test_every_method_reference_resolves(files, anchors):
    cited = 0
    unresolved = []
    for path, text in files.items():
        for row, line in enumerate(text.splitlines(), start=1):
            for anchor in METHOD_REF.findall(line):
                cited += 1
                if anchor not in anchors:
                    unresolved.append(f"{path}:{row}: docs/method.md#{anchor}")
    assert not unresolved, "references to missing headings:\n" + "\n".join(unresolved)
    assert cited > 0, "nothing in the repository cites docs/method.md"


def test_markdown_links_to_the_method_resolve(files, anchors):
    broken = []
    for path, text in files.items():
        if not path.endswith(".md"):
            continue
        base = (REPO / path).parent
        for target, anchor in MARKDOWN_LINK.findall(text):
            if (base / target).resolve() != METHOD.resolve() or (anchor and anchor not in anchors):
                broken.append(f"{path}: ]({target}#{anchor})")
        if path == "docs/method.md":
            broken += [
                f"{path}: ](#{a})" for a in re.findall(r"\]\(#([\w-]+)\)", text) if a not in anchors
            ]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_reference_outside_the_repository(files):
    found = []
    for path, text in files.items():
        for row, line in enumerate(text.splitlines(), start=1):
            where = f"{path}:{row}: {line.strip()}"
            if SPEC_FILE.search(line):
                found.append(f"{where}  (a specification that is not in the repository)")
            if SECTION_SIGN in line:
                found.append(f"{where}  (a section number of that specification)")
            if MACHINE_PATH.search(line):
                found.append(f"{where}  (a path of a development machine)")
            if SHARED in line and path not in SHARED_ALLOWED:
                if not (path == "README.md" and "default" in line):
                    found.append(f"{where}  (a folder beside the checkout)")
    assert not found, "references outside the repository:\n" + "\n".join(found)
