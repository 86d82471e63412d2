"""The repository stands alone: no file points at a build machine or at notes kept outside it, and the docs'
links and section references resolve.

The forbidden strings are assembled at run time (``"/" + "work" + "/"``, …) so that this file, which is
scanned like every other, does not contain them literally.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: What is scanned when git cannot list the tracked files (e.g. an exported source tree).
SCANNED = ("README.md", "docs", "src", "deploy", "proto", "config", "benchmarks", "tests")

_NOT_PATH = r"(?<![\w.~-])"  # a path starts here, not inside a word, a URL's host or a relative path
_USER = r"[A-Za-z0-9._-]+/"
#: Absolute paths of a build machine: its work tree, root's and users' home directories.
MACHINE_PATHS = re.compile(
    _NOT_PATH
    + "(?:"
    + "|".join(
        (
            re.escape("/" + "work" + "/"),
            re.escape("/" + "root" + "/"),
            re.escape("/" + "home" + "/") + _USER,
            re.escape("/" + "Users" + "/") + _USER,
        )
    )
    + ")"
)
#: The background folders the project was first built from, outside the repository.
BACKGROUND_DIRS = re.compile(re.escape("shared" + "/") + "(?:" + "docs" + "|" + "captures" + ")")
#: The background notes by file name; a mention is fine only if it resolves to a file of this repository
#: (the page of this repository's ``docs/`` does, a bare name of a note kept elsewhere does not).
BACKGROUND_FILES = re.compile(
    r"[\w./-]*?(?:" + "fpolicy-protocol" + "|" + "DESIGN" + "|" + "reference-pipeline" + r")\.md"
)


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@cache
def tracked_files() -> tuple[Path, ...]:
    """The tracked files, and new ones git does not ignore (``git ls-files``); every file under :data:`SCANNED`
    when git cannot answer."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        listed = ""
    if listed:
        return tuple(ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file())
    files: list[Path] = []
    for name in SCANNED:
        top = ROOT / name
        candidates = [top] if top.is_file() else sorted(top.rglob("*"))
        files.extend(p for p in candidates if p.is_file() and "__pycache__" not in p.parts)
    return tuple(files)


def text_files() -> Iterator[tuple[Path, str]]:
    for path in tracked_files():
        data = path.read_bytes()
        if _is_text(data):
            yield path, data.decode("utf-8")


def _resolves(mention: str, where: Path) -> bool:
    for base in (ROOT, where.parent):
        candidate = (base / mention).resolve()
        if candidate.is_file() and candidate.is_relative_to(ROOT):
            return True
    return False


def problems_in(text: str, where: Path) -> list[str]:
    """Every pointer outside the repository in ``text`` (a file at ``where``), as "line N: match"."""
    found: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        found.extend(f"line {number}: {m.group(0)!r}" for m in MACHINE_PATHS.finditer(line))
        found.extend(f"line {number}: {m.group(0)!r}" for m in BACKGROUND_DIRS.finditer(line))
        found.extend(
            f"line {number}: {m.group(0)!r} (not a file of this repository)"
            for m in BACKGROUND_FILES.finditer(line)
            if not _resolves(m.group(0), where)
        )
    return found


def test_the_scan_sees_the_repository() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in tracked_files()}
    assert {"README.md", "docs/protocol.md", "docs/reference-pipeline.md", "tests/unit/test_docs.py"} <= names
    assert any(name.startswith("src/fpolicyd/") for name in names)


def test_no_file_points_outside_the_repository() -> None:
    bad = {
        path.relative_to(ROOT).as_posix(): found for path, text in text_files() if (found := problems_in(text, path))
    }
    assert not bad, f"pointers to a build machine or to notes outside the repository: {bad}"


@pytest.mark.parametrize(
    "text",
    [
        "state under " + "/" + "work" + "/main/.venv",
        "see " + "/" + "root" + "/notes.txt",
        "cd " + "/" + "home" + "/alice/src",
        "open " + "/" + "Users" + "/bob/Desktop/x",
        "the " + "shared" + "/" + "docs" + " folder",
        "copied from " + "shared" + "/" + "captures" + "/",
        "read " + "fpolicy-protocol" + ".md §6",
        "(" + "DESIGN" + ".md)",
        "src/fpolicyd/" + "reference-pipeline" + ".md",
    ],
)
def test_the_scan_catches_outside_pointers(text: str) -> None:
    assert problems_in(text, ROOT / "README.md")


@pytest.mark.parametrize(
    "text",
    [
        "data_dir = /var/lib/fpolicyd",
        "--config /etc/fpolicyd/fpolicyd.toml",
        "tmp = /tmp/fpolicyd-test",
        'path = "/home/" + middle + "/file"',  # a generated path in a benchmark, no user directory
        "https://example.com/work/item",
        "/shared/a.csv",
        "see docs/protocol.md §4 and docs/" + "reference-pipeline" + ".md §5",
    ],
)
def test_the_scan_leaves_legitimate_content_alone(text: str) -> None:
    assert problems_in(text, ROOT / "README.md") == []


def test_a_mention_inside_docs_resolves_relative_to_docs() -> None:
    assert problems_in("[page](" + "reference-pipeline" + ".md)", ROOT / "docs" / "README.md") == []


# ------------------------------------------------------------------------------------------ markdown links

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//|#)", re.IGNORECASE)


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Link targets of a Markdown page that are paths in the repository (not URLs, not same-page anchors)."""
    text = _FENCE.sub("", text)
    targets = _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)
    return [t for t in targets if not _EXTERNAL.match(t)]


def test_relative_links_of_the_docs_point_at_files_that_exist() -> None:
    broken: dict[str, list[str]] = {}
    for page in markdown_pages():
        for target in relative_links(page.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0].split("?", 1)[0]
            resolved = (page.parent / path).resolve()
            if not (resolved.exists() and resolved.is_relative_to(ROOT)):
                broken.setdefault(page.relative_to(ROOT).as_posix(), []).append(target)
    assert not broken, f"relative links to nothing: {broken}"


def test_link_extraction() -> None:
    text = (
        "[a](docs/protocol.md) [b](https://docs.netapp.com/x) [c](#section) [d](../README.md#top)\n"
        '[e](proto/README.md "title")\n[ref]: config/fpolicyd.example.toml\n'
        "```sh\necho [not](a/link.md)\n```\n"
    )
    assert relative_links(text) == [
        "docs/protocol.md",
        "../README.md#top",
        "proto/README.md",
        "config/fpolicyd.example.toml",
    ]


# ----------------------------------------------------------------------------------- section references

_HEADING_NUMBER = re.compile(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", re.MULTILINE)
_SECTION_LIST = r"((?:§\d+(?:\.\d+)?(?:\s*(?:–|-|,|and)\s*)?)+)"


def sections_of(page: Path) -> set[str]:
    return set(_HEADING_NUMBER.findall(page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", ["docs/protocol.md", "docs/reference-pipeline.md"])
def test_section_references_name_sections_that_exist(page: str) -> None:
    """``<page> §N`` anywhere in the repository (and a bare ``§N`` inside the page) names a real section."""
    sections = sections_of(ROOT / page)
    assert sections, f"{page} has no numbered sections"
    mention = re.compile(re.escape(Path(page).name) + r"`{0,2}\)?\s*" + _SECTION_LIST)
    missing: dict[str, list[str]] = {}
    for path, text in text_files():
        spans = re.findall(_SECTION_LIST, text) if path == ROOT / page else mention.findall(text)
        for span in spans:
            for number in re.findall(r"§(\d+(?:\.\d+)?)", span):
                if number not in sections:
                    missing.setdefault(path.relative_to(ROOT).as_posix(), []).append(f"§{number}")
    assert not missing, f"references to sections {page} does not have: {missing}"


# ------------------------------------------------------------------------------------------ route table


def test_the_route_table_of_the_docs_is_the_packaged_one() -> None:
    packaged = tomllib.loads((ROOT / "src" / "fpolicyd" / "data" / "routes.toml").read_text(encoding="utf-8"))
    expected = [
        (r["id"], r["name"], r["prefixes"], r["suffixes"], r["operations"], r["target"]) for r in packaged["route"]
    ]
    rows = []
    for line in (ROOT / "docs/reference-pipeline.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| UC"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        uc_id, name, prefixes, suffixes, operations, target = cells
        rows.append(
            (
                uc_id,
                name.strip("`"),
                [p.strip("`") for p in prefixes.split()],
                [s.strip("`") for s in suffixes.split()],
                [o.strip() for o in operations.split(",")],
                target,
            )
        )
    assert rows == expected
