"""The repository stands alone: no tracked file holds a machine's absolute path, links to a file
outside the repository, or names a document the repository does not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINARY = (".png", ".pdf", ".jpg", ".jpeg", ".gif", ".ico", ".woff", ".woff2", ".ttf", ".parquet", ".whl", ".gz")

# an absolute path on a machine: a root folder of a Unix or macOS file system, or a Windows drive,
# followed by a name ("/tmp/x", "/home/u", "C:\Users"); a shebang's interpreter is not one
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])(/(?:work|root|home|tmp|Users|mnt|opt|srv|private|var/folders)/[\w.-]"
                          r"|[A-Z]:\\(?:Users|Documents and Settings)\\)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MARKDOWN_FILE = re.compile(r"(?<![\w/.-])((?:\.{1,2}/)?[\w./-]*[\w-]+\.md)\b")
URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    # this file holds the patterns and their own test cases
    return [ROOT / p for p in out.decode().split("\0")
            if p and not p.endswith(BINARY) and p != "tests/test_standalone.py"]


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError):
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not (number == 1 and line.startswith("#!")):
            yield number, line


def test_no_tracked_file_holds_a_machine_path():
    found = [f"{p.relative_to(ROOT)}:{n}: {m.group(0)}" for p in _tracked() for n, line in _lines(p)
             for m in MACHINE_PATH.finditer(line)]
    assert not found, "absolute machine paths in tracked files:\n" + "\n".join(found[:40])


def test_links_stay_inside_the_repository():
    bad = []
    for path in _tracked():
        if path.suffix != ".md":
            continue
        for n, line in _lines(path):
            for target in MARKDOWN_LINK.findall(line):
                if URL.match(target) or target.startswith("#"):
                    continue
                resolved = (path.parent / target.split("#")[0]).resolve()
                if not resolved.is_relative_to(ROOT) or not resolved.exists():
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {target}")
    assert not bad, "links that leave the repository or point nowhere:\n" + "\n".join(bad)


def test_every_named_document_is_in_the_repository():
    # a docstring, comment or page that names a Markdown file names one the repository has
    names = {p.name for p in _tracked()}
    missing = []
    for path in _tracked():
        for n, line in _lines(path):
            for ref in MARKDOWN_FILE.findall(line):
                if "://" in line and ref in line.split("://", 1)[1]:
                    continue
                if ref.startswith(("./", "../")):  # a relative reference: to a file of the repository
                    target = (path.parent / ref).resolve()
                    ok = target.is_relative_to(ROOT) and target.exists()
                else:
                    ok = Path(ref).name in names
                if not ok:
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {ref}")
    assert not missing, "documents named but not in the repository:\n" + "\n".join(missing)


def test_the_guards_catch_what_they_guard():
    # the patterns themselves must be able to fail
    assert MACHINE_PATH.search("see /work/main/x.py") and MACHINE_PATH.search("C:\\Users\\me")
    assert not MACHINE_PATH.search("#!/usr/bin/env python3") and not MACHINE_PATH.search("https://a.org/home/x")
    assert MARKDOWN_FILE.findall("read ../shared/DESIGN.md first") == ["../shared/DESIGN.md"]
    assert MARKDOWN_LINK.findall("[posts](../shared/posts.md)") == ["../shared/posts.md"]
