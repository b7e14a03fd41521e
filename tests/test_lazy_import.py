"""``import gradlab`` is cheap and has no side effects; the public names still resolve."""

from __future__ import annotations

import subprocess
import sys


def test_import_gradlab_imports_neither_sympy_nor_jax():
    code = ("import sys, gradlab; heavy = [m for m in ('sympy', 'jax', 'numpy', 'matplotlib') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_every_public_name_resolves_lazily():
    import gradlab

    for name in gradlab.__all__:
        assert getattr(gradlab, name) is not None, name
    assert gradlab.get_loss("dpo").name == "dpo" and "dpo" in gradlab.list_losses()
    assert gradlab.symbols.symbol("lp_w").name == "lp_w"  # a submodule by attribute
    try:
        gradlab.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
