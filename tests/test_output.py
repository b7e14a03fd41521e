"""gradlab.output: one JSON policy for numbers, and one safe writer (atomic files, a manifest of
content hashes, folder checks, a lock) used by every command that writes files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import mpmath
import numpy as np
import pytest
import sympy

from gradlab import output
from gradlab.errors import GradlabError

ROOT = Path(__file__).resolve().parents[1]
fcntl = pytest.importorskip("fcntl")


# -- JSON numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (1.5, 1.5), (np.float32(2.5), 2.5), (np.float64(-0.0), -0.0), (5e-324, 5e-324),  # float64 as it is
    (float("nan"), None), (float("inf"), None), (np.float64("-inf"), None), (mpmath.mpf("inf"), None),
    (sympy.nan, None), (sympy.zoo, None), (sympy.oo, None),
    (7, 7), (np.int64(-3), -3), (2**80, 2**80), (sympy.Integer(5), 5),  # integers stay exact
    (True, True), (np.bool_(False), False),
    (Fraction(1, 4), 0.25), (sympy.Rational(1, 3), 1 / 3), (mpmath.mpf(0), 0.0),
])
def test_numbers_follow_the_one_policy(value, expected):
    got = output.number(value)
    assert got == expected and type(got) is type(expected)
    if isinstance(expected, float):
        assert math.copysign(1, got) == math.copysign(1, expected)


@pytest.mark.parametrize("value, digits", [
    (mpmath.mpf("1.2e500"), "1.2e+500"), (-mpmath.mpf("3.5e-320"), "-3.5e-320"),
    (sympy.Float("1e-400", 30), "1.0e-400"), (Decimal("-2.5e400"), "-2.5e+400"),
])
def test_values_beyond_float64_are_decimal_strings_with_17_digits(value, digits):
    with mpmath.workdps(40):
        got = output.number(mpmath.mpf(value) if isinstance(value, mpmath.mpf) else value)
        assert isinstance(got, str)
        # an independent reading: the string is the value to 17 significant digits
        assert abs(mpmath.mpf(got) / mpmath.mpf(digits) - 1) < mpmath.mpf("1e-16")


def test_documents_never_hold_nan_or_infinity():
    doc = {"a": np.array([[1.0, np.nan], [np.inf, -2.0]]), 3: (None, "x", [np.float32("nan")]),
           "deep": {"m": Decimal("1e-400"), "b": np.bool_(True)}}
    text = output.dumps(doc, indent=1)
    parsed = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-finite {token} in JSON"))
    assert parsed == {"a": [[1.0, None], [None, -2.0]], "3": [None, "x", [None]],
                      "deep": {"m": "1.0e-400", "b": True}}
    with pytest.raises(TypeError, match="cannot write object"):
        output.dumps({"x": object()})


def test_the_reproduction_report_follows_the_policy():
    from gradlab.reproduce import ENTRIES, Result

    entry = next(iter(ENTRIES.values()))
    measured = {"ratio": float("nan"), "ok": np.bool_(True), "n": np.int64(3)}
    result = Result(entry, "FAIL", measured, None, 0.0, quick=True)
    assert result.as_dict()["measured"] == {"ratio": None, "ok": True, "n": 3}


# -- atomic files -----------------------------------------------------------------------------


def test_an_atomic_write_replaces_whole_and_a_failed_one_leaves_the_old_file(tmp_path):
    target = tmp_path / "data.bin"
    output.write_atomic(target, b"old")
    with pytest.raises(KeyboardInterrupt), output.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".gradlab-tmp-") and tmp.exists()
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]  # its own temporary file is gone


def test_temporary_looking_files_gradlab_did_not_create_are_never_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    theirs = [".gradlab-x.tmp", ".gradlab-tmp-0123456789abcdef-x.tmp"]
    for name in theirs:
        (out / name).write_text("the user's")
    with pytest.raises(GradlabError, match=r"\.gradlab-x\.tmp"):  # not a name gradlab gives: foreign
        output.Folder(out)
    folder = output.Folder(out, shared=True)
    folder.write({"a.txt": b"1"})
    with pytest.raises(RuntimeError), output.atomic_path(out / "b.txt"):
        raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == sorted([*theirs, "a.txt", output.MANIFEST])
    for name in theirs:
        assert (out / name).read_text() == "the user's"


# -- the manifest -----------------------------------------------------------------------------


def test_a_foreign_manifest_does_not_unlock_a_users_file(tmp_path):
    for shared in (False, True):
        out = tmp_path / f"shared-{shared}"
        out.mkdir()
        (out / "README.md").write_text("my own readme\n")
        forged = "0" * 64
        (out / output.MANIFEST).write_text(json.dumps({"files": {"README.md": forged}}))
        with pytest.raises(GradlabError, match="did not write"):
            output.Folder(out, shared=shared).write({"README.md": b"gradlab's gallery"})
        assert (out / "README.md").read_text() == "my own readme\n"
        # a manifest in the earlier format (names without hashes) vouches for nothing either
        (out / output.MANIFEST).write_text(json.dumps({"files": ["README.md"]}))
        with pytest.raises(GradlabError, match="no content hashes"):
            output.Folder(out, shared=shared).write({"README.md": b"gradlab's gallery"})
        assert (out / "README.md").read_text() == "my own readme\n"


def test_gradlab_rewrites_its_own_files_but_not_one_edited_since(tmp_path):
    out = tmp_path / "out"
    output.write_files(out, {"a.txt": b"1", "b.txt": b"2"})
    output.write_files(out, {"a.txt": b"3"})  # its own file, unchanged since: replaced
    assert (out / "a.txt").read_bytes() == b"3"
    (out / "b.txt").write_bytes(b"edited by hand")
    with pytest.raises(GradlabError, match="changed since"):
        output.write_files(out, {"b.txt": b"4"})
    assert (out / "b.txt").read_bytes() == b"edited by hand"
    recorded = json.loads((out / output.MANIFEST).read_text())["files"]
    assert recorded["a.txt"] == hashlib.sha256(b"3").hexdigest()


def test_a_run_killed_between_the_manifest_and_the_file_leaves_a_folder_the_next_run_accepts(tmp_path):
    out = tmp_path / "out"
    output.write_files(out, {"a.txt": b"old"})
    doc = json.loads((out / output.MANIFEST).read_text())
    doc["pending"] = {"a.txt": hashlib.sha256(b"new").hexdigest()}
    (out / output.MANIFEST).write_text(json.dumps(doc))  # as a run killed right after recording 'new'
    assert output.Folder(out).files() == {"a.txt": doc["files"]["a.txt"]}
    (out / "a.txt").write_bytes(b"new")  # ... or killed right after the rename
    output.write_files(out, {"a.txt": b"newer"})
    assert "pending" not in json.loads((out / output.MANIFEST).read_text())


def test_an_own_folder_refuses_foreign_files_and_a_shared_one_leaves_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad, why in (("", "empty"), (".", "current directory")):
        with pytest.raises(GradlabError, match=why):
            output.Folder(bad)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / ".git").mkdir()
    with pytest.raises(GradlabError, match="project root"):
        output.Folder(tmp_path / "proj", shared=True)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.txt").write_text("hand-written")
    with pytest.raises(GradlabError, match="guide.txt"):
        output.Folder(docs)
    output.write_files(docs, {"generated.txt": b"x"}, shared=True)
    assert (docs / "guide.txt").read_text() == "hand-written"
    for name in ("../x", "a/b", output.MANIFEST, ""):
        with pytest.raises(GradlabError, match="plain file name"):
            output.write_files(docs, {name: b"x"}, shared=True)


def test_adopting_records_the_current_content(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fig.png").write_bytes(b"png")
    (out / output.MANIFEST).write_text(json.dumps({"files": ["fig.png"]}))  # the earlier format
    output.adopt(out, ["fig.png"])
    assert output.Folder(out).files() == {"fig.png": hashlib.sha256(b"png").hexdigest()}


# -- the lock ---------------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys
    from gradlab import output
    out, tag = sys.argv[1], sys.argv[2]
    for i in range(25):
        output.write_files(out, {f"{tag}-{i}.txt": f"{tag} {i}".encode(), "README.md": tag.encode()})
""")


def test_concurrent_runs_into_one_folder_lose_no_manifest_entries(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(out), tag], env=env) for tag in "abc"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    files = output.Folder(out).files()  # the folder is not refused afterwards
    assert set(files) == {f"{t}-{i}.txt" for t in "abc" for i in range(25)} | {"README.md"}


def test_a_run_that_cannot_get_the_lock_stops_with_a_clear_error(tmp_path):
    out = tmp_path / "out"
    folder = output.Folder(out, lock_wait=0.2)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the folder
        with pytest.raises(GradlabError, match="another gradlab run"):
            folder.write({"a.txt": b"1"})
    finally:
        os.close(fd)
    folder.write({"a.txt": b"1"})  # released: it goes through


# -- the writers that use it ------------------------------------------------------------------


def test_generated_docs_are_written_only_over_their_own_earlier_version(tmp_path):
    from gradlab import catalogue

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "trl.md").write_text("someone's notes\n")
    assert catalogue.main([str(docs / "trl.md")]) == 2
    assert (docs / "trl.md").read_text() == "someone's notes\n"
    (docs / "trl.md").unlink()
    assert catalogue.main([str(docs / "trl.md")]) == 0
    assert catalogue.main([str(docs / "trl.md")]) == 0  # its own file: regenerated
    assert (docs / "trl.md").read_text() == catalogue.render_trl()


def test_audit_out_keeps_a_manifest_and_never_overwrites_a_foreign_file(tmp_path, monkeypatch):
    from helpers import run_cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "audit"
    out.mkdir()
    (out / "audit_weight_vs_length_difference.png").write_bytes(b"mine")
    argv = ["audit", str(ROOT / "examples" / "audit_pairs.jsonl"), "--loss", "dpo", "--out"]
    code, _, err = run_cli([*argv, str(out)])
    assert code == 2 and "did not write" in err, err
    assert (out / "audit_weight_vs_length_difference.png").read_bytes() == b"mine"
    fresh = tmp_path / "fresh"
    for _ in range(2):  # the second run replaces its own files
        code, _, err = run_cli([*argv, str(fresh)])
        assert code == 0, err
    written = {p.name for p in fresh.iterdir()} - {output.MANIFEST}
    assert written and set(output.Folder(fresh).files()) == written
