"""``gradlab list``, ``show`` and ``grad`` answer from the shipped table without sympy or JAX; the
table is current, and a table that does not match the sources it was made from is never served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradlab import answers, catalogue
from gradlab.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("sympy", "jax", "numpy", "matplotlib", "mpmath")

# runs the CLI in a fresh interpreter, then reports on stderr which heavy modules it imported
_PROBE = """
import sys
from gradlab import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("HEAVY", [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
sys.exit(code)
"""


def _cli(*args: str, cwd: Path = ROOT, pythonpath: Path = ROOT) -> tuple[int, str, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    line = next(x for x in done.stderr.splitlines() if x.startswith("HEAVY "))
    return done.returncode, done.stdout, json.loads(line[6:].replace("'", '"'))


def test_the_shipped_table_is_current():
    assert answers.TABLE.exists(), "gradlab/answers.jsonl is missing; run 'python3 tasks.py docs'"
    stale = "gradlab/answers.jsonl is stale; run 'python3 tasks.py docs'"
    assert answers.TABLE.read_text(encoding="utf-8") == catalogue.render_answers(), stale
    assert answers.table() is not None, stale


def test_the_table_covers_every_registered_loss_and_name():
    found = answers.decode(answers.TABLE.read_text(encoding="utf-8"))
    assert set(found["show"]) == set(LOSSES) == set(found["grad"])
    assert found["names"]["sigmoid"] == "dpo" and found["names"]["dpo"] == "dpo"
    for name, loss in LOSSES.items():
        assert set(found["grad"][name]["log"]["partials"]) == {*loss.variables, *loss.hyperparameters}


def test_a_table_whose_sources_changed_is_not_served(tmp_path):
    doc = answers.table()  # the head: what the freshness check reads
    assert answers.table(tmp_path / "absent.json") is None
    for key in ("gradlab/losses.py", "sympy/release.py"):
        changed = dict(doc, sources={**doc["sources"], key: "0" * 64})
        path = tmp_path / f"{key.replace('/', '_')}.json"
        path.write_text(json.dumps(changed), encoding="utf-8")
        assert answers.table(path) is None, key
    missing = dict(doc, sources={**doc["sources"], "gradlab/no_such_module.py": "0" * 64})
    (tmp_path / "missing.json").write_text(json.dumps(missing), encoding="utf-8")
    assert answers.table(tmp_path / "missing.json") is None
    (tmp_path / "same.json").write_text(json.dumps(doc), encoding="utf-8")
    assert answers.table(tmp_path / "same.json") is not None  # the control: an unchanged copy is served


def test_the_sources_cover_the_loss_definitions_and_their_derivation():
    keys = set(answers.source_files())
    assert {"gradlab/losses.py", "gradlab/symbolic.py", "gradlab/printing.py", "gradlab/symbols.py",
            "gradlab/answers.py", "gradlab/parsing.py", "sympy/release.py"} <= keys
    assert "gradlab/cli.py" not in keys and "gradlab/policies.py" not in keys


@pytest.mark.parametrize("args", [
    ["--version"], ["--help"], ["grad", "--help"], ["list"], ["list", "--json"], ["show", "dpo"],
    ["show", "sigmoid", "--json"], ["grad", "ipo", "--wrt", "p_l", "--view", "probability", "--json"],
    ["grad", "dpo", "--wrt", "len_w", "--view", "length"],
])
def test_commands_answered_from_the_table_import_neither_sympy_nor_jax(args):
    code, out, heavy = _cli(*args)
    assert code == 0 and out.strip()
    assert heavy == []


def test_answers_from_the_table_are_the_derived_answers():
    loss = LOSSES["simpo"]
    for view, wrt in (("log", "lp_w"), ("length", "len_l"), ("probability", "beta")):
        assert answers.grad("simpo", None, wrt, view) == answers.derive_grad(loss, wrt, view)
    assert answers.show("simpo", None) == answers.derive_show(loss)
    assert answers.list_document() == answers.derive_list()


def test_a_changed_loss_definition_is_derived_not_served_from_the_table(tmp_path):
    """A copy of the package whose dpo has another default beta: the CLI must print the new
    definition, which the shipped table (copied along, unchanged) does not hold."""
    copy = tmp_path / "gradlab"
    shutil.copytree(ROOT / "gradlab", copy, ignore=shutil.ignore_patterns("__pycache__"))
    source = (copy / "losses.py").read_text(encoding="utf-8")
    marker = "def dpo(lp_w: Expr, lp_l: Expr, ref_w: Expr, ref_l: Expr, *, beta: Hyper = BETA) -> Expr:"
    assert marker in source
    changed = marker.replace("= BETA", "= 0.25")
    assert changed != marker
    (copy / "losses.py").write_text(source.replace(marker, changed),
                                    encoding="utf-8")
    code, out, heavy = _cli("show", "dpo", "--json", cwd=tmp_path, pythonpath=tmp_path)
    assert code == 0 and "sympy" in heavy
    assert json.loads(out)["defaults"] == {"beta": 0.25}
    code, out, heavy = _cli("show", "dpo", "--json")  # the control: the real package serves 0.1
    assert code == 0 and heavy == [] and json.loads(out)["defaults"] == {"beta": 0.1}


def test_bad_output_folders_are_refused_before_any_heavy_import(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine", encoding="utf-8")
    for args in (["figures", "--out", "."], ["figures", "--out", "mine"],
                 ["figures", "no_such_figure", "--out", "new"], ["reproduce", "--all", "--figures", "mine"]):
        code, out, heavy = _cli(*args, cwd=tmp_path)
        assert code == 2 and out == "" and heavy == [], args
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and [p.name for p in mine.iterdir()] == ["notes.txt"]
