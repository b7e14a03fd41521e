"""The notebooks as a person uses them: JupyterLab in headless Chromium, driven by Playwright.

For every notebook: open it (no "Select Kernel" dialog may appear), Run All, and check that
every plot is an image (never the text ``<Figure size ...>``), every widget renders, no cell
shows an error and the browser logs no console error; save it and check the saved outputs as
the headless run does (``tests/test_notebooks.py``, which leaves the execution to this test where
a browser is available); then use one control and check that the image it drives changes.
Screenshots go to ``.artifacts/browser/`` (ignored by git).

The browser is the operating system's Chromium (``apt-get install chromium``; Playwright's own
download is not used). Without one, the tests skip locally and FAIL in CI (``CI`` set), so a CI
run can never pass by skipping them. ``GRADLAB_CHROMIUM`` names another executable.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import assert_notebook_ran_cleanly, browser_unavailable, chromium_path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ARTIFACTS = ROOT / ".artifacts" / "browser"
RUN_TIMEOUT_S = 150

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(folder: Path) -> None:
    """JupyterLab settings for a test: render every cell (no windowing, so every output is in
    the page), save the widgets' state with the notebook (as the headless run stores it), and no
    news or update prompts."""
    settings = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyter-widgets/jupyterlab-manager/plugin.jupyterlab-settings": {"saveState": True},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false", "checkForUpdates": False},
    }
    for rel, value in settings.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on localhost with a random token, serving a copy of the notebooks
    (so autosave can never write outputs into the committed files)."""
    chromium = chromium_path()
    try:
        import jupyterlab  # noqa: F401
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        browser_unavailable(f"{exc.name} is not installed")
    base = tmp_path_factory.mktemp("lab")
    work = base / "notebooks"
    shutil.copytree(ROOT / "notebooks", work)
    _write_settings(base / "settings")
    token, port = secrets.token_hex(16), _free_port()
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "MPLBACKEND": "Agg"}
    log = open(base / "server.log", "w")  # noqa: SIM115 - closed in the finaliser
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         "--ServerApp.open_browser=False", "--LabApp.news_url=", "--ServerApp.allow_remote_access=False",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n" + (base / "server.log").read_text()[-3000:])
                time.sleep(0.3)
        yield {"url": url, "token": token, "chromium": chromium, "work": work, "log": base / "server.log"}
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab, chromium_browser):
    return chromium_browser


# what "use one control" means in each notebook, and which image (by order in the page) it drives
def _move_slider(page, index: int = 0) -> None:
    handle = page.locator(".widget-slider .noUi-handle").nth(index)
    handle.scroll_into_view_if_needed()
    handle.focus()
    page.keyboard.press("ArrowRight")


def _pick_loss(page) -> None:
    select = page.locator(".widget-dropdown select").first
    select.scroll_into_view_if_needed()
    select.select_option(label="IPO (ipo)")


def _type_formula(page) -> None:
    box = page.locator(".widget-text input[type=text]").first
    box.scroll_into_view_if_needed()
    box.fill("softplus(-beta*((lp_w - ref_w) - (lp_l - ref_l))) + cpo_alpha*(lp_w - lp_l)**2")
    page.get_by_role("button", name="analyse").click()


CONTROLS = {
    "01_posts_derived": (_move_slider, 0),
    "02_gradient_atlas": (_move_slider, 0),
    "03_length_bias": (_move_slider, 0),
    "04_entropy_reference": (_move_slider, 0),
    "05_displacement": (_pick_loss, 0),
    "06_bring_your_own_loss": (_type_formula, 0),
}


def _images(page) -> list[str]:
    return page.eval_on_selector_all(".jp-OutputArea-output img", "els => els.map(e => e.src)")


def _prompts(page) -> list[str]:
    return [p.strip() for p in
            page.eval_on_selector_all(".jp-CodeCell .jp-InputArea-prompt", "els => els.map(e => e.textContent)")]


def _started(page, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p not in ("[ ]:", "") for p in _prompts(page)):
            return True
        page.wait_for_timeout(250)
    return False


def _page_shows_idle(page) -> bool:
    return page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0


def _wait_for_one_stable_kernel(lab, page, name: str, timeout_s: float = 90, stable_s: float = 1.5,
                                idle_s: float = 1) -> None:
    """Until the server has exactly one session for the notebook, whose kernel is idle and has
    stayed the same kernel for ``stable_s`` seconds, while the page has shown the kernel idle for
    ``idle_s`` seconds (connected and ready): both at once, so the two waits overlap. JupyterLab
    may start a kernel and replace it while the page loads; pressing Run All during the
    replacement opens a "Select Kernel" dialog."""
    deadline, seen, since, idle_since = time.monotonic() + timeout_s, None, 0.0, None
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=10) as r:
            sessions = [s for s in json.load(r) if s.get("path", "").endswith(name)]
        kernel = sessions[0]["kernel"] if len(sessions) == 1 and sessions[0].get("kernel") else None
        key = kernel["id"] if kernel and kernel.get("execution_state") == "idle" else None
        now = time.monotonic()
        idle_since = (idle_since or now) if _page_shows_idle(page) else None
        if key is None or key != seen:
            seen, since = key, now
        elif now - since >= stable_s and idle_since is not None and now - idle_since >= idle_s:
            return
        page.wait_for_timeout(250)
    pytest.fail(f"no stable idle kernel for {name}")


def _wait_for_idle_kernel(page, timeout_s: float = 90) -> None:
    """Until the kernel has been idle for two seconds in a row (it is connected and ready)."""
    deadline, idle_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        idle_since = (idle_since or time.monotonic()) if _page_shows_idle(page) else None
        if idle_since and time.monotonic() - idle_since > 2:
            return
        page.wait_for_timeout(250)
    pytest.fail("the kernel did not become idle")


def _wait_for_run(page, timeout_s: float) -> None:
    """Until every code cell has run: an execution count in each prompt, none busy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputArea-prompt", "els => els.map(e => e.textContent)")
        if prompts and all(p.strip().startswith("[") and p.strip()[1:-2].strip().isdigit() for p in prompts):
            return
        page.wait_for_timeout(500)
    pytest.fail(f"the notebook did not finish within {timeout_s:.0f} s; prompts: {prompts}")


# one JupyterLab server for the six (the module's fixture): one worker runs them all
@pytest.mark.long(seconds=75, group="jupyterlab")
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_in_jupyterlab(lab, browser, notebook):
    assert notebook.stem in CONTROLS, f"say which control the browser test uses in {notebook.name}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(f"page error: {e}"))
    shot = ARTIFACTS / notebook.stem
    try:
        # a workspace of its own per notebook: no tabs restored from the previous test
        page.goto(f"{lab['url']}/lab/workspaces/{notebook.stem}/tree/{notebook.name}?reset&token={lab['token']}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook", timeout=60_000)
        # a notebook with kernel metadata starts its kernel without asking
        _wait_for_one_stable_kernel(lab, page, notebook.name)
        assert page.locator(".jp-Dialog").count() == 0, "a dialog opened: " + page.locator(".jp-Dialog").inner_text()
        for _attempt in range(3):  # JupyterLab may replace the kernel it first started while connecting
            page.locator(".jp-Notebook .jp-Cell").first.click()  # focus the notebook, as a person would
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            if _started(page, 20):
                break
            _wait_for_idle_kernel(page)
        page.screenshot(path=f"{shot}-started.png")
        _wait_for_run(page, RUN_TIMEOUT_S)
        page.wait_for_timeout(500)  # let the widget views render their last state
        page.screenshot(path=f"{shot}-run.png")
        # the checks of the headless run (tests/test_notebooks.py), on the notebook as saved
        assert_notebook_ran_cleanly(_save(page, lab["work"] / notebook.name), notebook.stem)

        text = page.locator(".jp-Notebook").inner_text()
        assert "<Figure size" not in text, "a plot is shown as text, not as an image"
        for bad in ("Traceback", "Error displaying widget", "Loading widget..."):
            assert bad not in text, f"{notebook.name} shows {bad!r}"
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], "
                              "[data-mime-type='application/vnd.jupyter.error']")
        error_texts = [t for t in errors.all_inner_texts() if "Error" in t or "Traceback" in t]
        assert not error_texts, error_texts
        widget_outputs = page.locator(".jp-OutputArea-output .jupyter-widgets").count()
        assert widget_outputs > 0, "no widget rendered"
        images = page.locator(".jp-OutputArea-output img")
        assert images.count() > 0, "no plot image in the notebook"
        sizes = page.eval_on_selector_all(".jp-OutputArea-output img", "els => els.map(e => e.naturalWidth)")
        # an Image widget that has not been given a picture yet (the training panel before
        # training) has no size; every other image must have decoded
        assert sum(1 for s in sizes if s > 0) >= 1 and all(s > 0 for s in sizes), sizes

        action, index = CONTROLS[notebook.stem]
        before = _images(page)
        action(page)
        deadline = time.monotonic() + 120
        while _images(page) == before and time.monotonic() < deadline:
            page.wait_for_timeout(250)
        after = _images(page)
        page.locator(".jp-OutputArea-output img").nth(index).scroll_into_view_if_needed()
        page.screenshot(path=f"{shot}-control.png")
        assert after != before, f"using the control in {notebook.name} did not change any image"
        text = page.locator(".jp-Notebook").inner_text()
        assert "Traceback" not in text and "Not accepted" not in text and "could not analyse" not in text
        assert not console_errors, console_errors
    except BaseException:  # pytest.fail raises a BaseException
        page.screenshot(path=f"{shot}-failure.png")
        raise
    finally:
        context.close()
        _shutdown_kernels(lab)


def _save(page, path: Path, timeout_s: float = 60):
    """Save the notebook as a person would (Ctrl+S) and read back what JupyterLab wrote: the
    copy starts without outputs, so the file is saved once every code cell has a count."""
    import nbformat  # here, not at the top: see test_tasks.py's _HEAVY

    page.locator(".jp-Notebook .jp-Cell").first.click()
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            nb = nbformat.reads(path.read_text(), as_version=4)
        except (OSError, ValueError):  # not yet written in full
            nb = None
        if nb is not None and all(c.execution_count for c in nb.cells if c.cell_type == "code"):
            return nb
        page.wait_for_timeout(250)
    pytest.fail(f"JupyterLab did not save {path.name} within {timeout_s:.0f} s")


def _shutdown_kernels(lab) -> None:
    """Stop the notebook's kernel, so the next notebook has the cores to itself."""
    url, token = lab["url"], lab["token"]
    with urllib.request.urlopen(f"{url}/api/kernels?token={token}", timeout=10) as r:
        kernels = json.load(r)
    for k in kernels:
        req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
        with urllib.request.urlopen(req, timeout=30):
            pass


# --------------------------------------------------------------------------------------------
# The committed figures as a reader sees them: each decoded and screenshotted in Chromium
# --------------------------------------------------------------------------------------------

FIGURE_PNGS = sorted((ROOT / "figures").glob("*.png")) + sorted((ROOT / "figures" / "reproductions").glob("*.png"))


@pytest.fixture(scope="module")
def bare_browser(chromium_browser):
    return chromium_browser


def test_every_committed_figure_decodes_and_is_screenshotted(bare_browser, tmp_path):
    """Every committed PNG opens in Chromium at its natural size; a screenshot of each, as a
    reader sees it, goes to ``.artifacts/browser/figures/`` for a person to look at."""
    assert len(FIGURE_PNGS) >= 20
    shots = ARTIFACTS / "figures"
    shots.mkdir(parents=True, exist_ok=True)
    page_html = tmp_path / "figures.html"
    page_html.write_text("<!doctype html><html><body style='margin:0;background:white'>" + "".join(
        f"<img id='f{i}' src='{png.as_uri()}' style='display:block;margin:0 0 8px 0'>"
        for i, png in enumerate(FIGURE_PNGS)) + "</body></html>")
    context = bare_browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto(page_html.as_uri())
        page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=60_000)
        sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
        undecoded = [p.name for p, (w, h) in zip(FIGURE_PNGS, sizes, strict=True) if not (w and h)]
        assert not undecoded, f"figures that do not decode: {undecoded}"
        for i, png in enumerate(FIGURE_PNGS):
            folder = "reproductions-" if png.parent.name == "reproductions" else ""
            page.locator(f"#f{i}").screenshot(path=str(shots / f"{folder}{png.name}"))
        assert not errors, errors
    finally:
        context.close()
