"""The static website (``gradlab.website``), built reduced to a few losses and driven in Chromium.

The build itself is checked without a browser: its pages load nothing from the network, a link
to a missing file fails it, a page the checkout lacks drops out of the navigation, and bad
arguments exit with status 2. In Chromium (Debian's, as in ``test_browser.py``: skipped locally
without it, a failure in CI) every page is loaded over HTTP with no console error, every image
decodes, every link resolves inside the site or is a URL; the explorer opens the loss and
hyperparameter the URL names, answers a control change (timed by the page itself), follows a
drag, and its numbers equal gradlab's arbitrary-precision values to 1e-9; the self-test page
passes. Screenshots go to ``.artifacts/site/`` (ignored by git).
"""

from __future__ import annotations

import functools
import http.server
import math
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import unavailable

from gradlab import symbolic, website

# the site is built once for the module and crawled in a browser (tens of seconds): first (conftest)
pytestmark = pytest.mark.long(seconds=23)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / ".artifacts" / "site"
# a reduced build: enough for a weighted combination (sigmoid = dpo), a length-normalised loss,
# a loss of one response (sft) and one with an extra hyperparameter (simpo_gamma)
LOSSES = ("dpo", "simpo", "ipo", "orpo", "sft", "bco_pair")
TOLERANCE = 1e-9


def _mkdocs():
    try:
        import mathjax  # noqa: F401
        import mkdocs  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as exc:
        unavailable("site tests", f"{exc.name} is not installed", "pip install -e '.[site]'; CI installs it")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    _mkdocs()
    return website.build(tmp_path_factory.mktemp("site") / "site", [website.LOSSES[n] for n in LOSSES])


# ------------------------------------------------------------------------------ without a browser


def test_site_loads_nothing_from_the_network(site):
    pages = list(site.rglob("*.html"))
    assert {"index.html", "explorer/index.html", "explorer/selftest.html", "docs/losses/index.html"} <= {
        p.relative_to(site).as_posix() for p in pages}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        # scripts, stylesheets, images and fonts: all relative (links to other sites are fine)
        for tag, attr in (("script", "src"), ("link", "href"), ("img", "src")):
            for url in re.findall(rf"<{tag}\b[^>]*\b{attr}=\"([^\"]+)\"", text):
                assert not re.match(r"^(https?:)?//", url), f"{page.relative_to(site)} loads {url}"
    for css in site.rglob("*.css"):
        assert not re.search(r"url\(['\"]?(https?:)?//", css.read_text(encoding="utf-8")), css
    assert (site / "assets" / "mathjax" / "tex-svg-full.js").stat().st_size > 1_000_000


def test_catalogue_has_every_view_trl_and_audit(site):
    html = (site / "docs" / "losses" / "index.html").read_text(encoding="utf-8")
    for name in LOSSES:
        assert f'id="{name}"' in html, name
        assert f"../../explorer/index.html?loss={name}" in html or f"../../explorer/?loss={name}" in html
    for view in ("log", "probability", "length", "margin"):
        assert f"Gradients, {view} view" in html
    assert "DPOConfig" in html and "loss_type=sigmoid" in html  # dpo's TRL row
    assert "differences found" in html  # the audit row


def test_explorer_data_is_generated_javascript(site):
    js = (site / "explorer" / "losses.js").read_text(encoding="utf-8")
    assert "G.softplus" in js or "G.sigmoid" in js  # the stable forms, not log(1 + exp(...))
    assert "eval(" not in js and "new Function" not in js
    for path in (site / "explorer").glob("*.js"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\beval\(|new Function|innerHTML\s*=\s*[^\"`]*location", text), path


def test_explorer_data_holds_the_neutral_point():
    # every variable off the field views' axes where the explorer draws: the reference gives each
    # response probability 0.3, single-token responses, no LD-DPO tails
    fixed = website.explorer_data([website.LOSSES["dpo"]])["fixed"]
    assert fixed == pytest.approx({"q_w": 0.3, "q_l": 0.3, "ref_w": math.log(0.3), "ref_l": math.log(0.3),
                                   "len_w": 1.0, "len_l": 1.0, "tail_w": 0.0, "tail_l": 0.0,
                                   "ref_tail_w": 0.0, "ref_tail_l": 0.0}, rel=1e-15)


def test_js_expr_prints_the_stable_closed_form():
    expr = symbolic.derivative("dpo", "lp_l", "log")
    js = website.js_expr(expr)
    assert "v.lp_l" in js and "v.beta" in js and "G.sigmoid" in js
    assert "Math.exp(" not in js or "G." in js


def _fake_repo(tmp_path: Path, readme: str, background: bool) -> Path:
    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "docs" / "losses.md").write_text("# stand-in\n")
    if background:
        (tmp_path / "docs" / "background.md").write_text("# Background\n")
    return tmp_path


def test_a_link_to_a_missing_file_fails_the_build(tmp_path):
    _mkdocs()
    root = _fake_repo(tmp_path / "repo", "# x\n\n![](figures/missing.png)\n", background=False)
    with pytest.raises(website.SiteError, match="missing.png"):
        website.stage(tmp_path / "staging", [website.LOSSES["dpo"]], root)


@pytest.mark.parametrize("background", [False, True])
def test_background_page_is_in_the_nav_when_it_exists(tmp_path, background):
    _mkdocs()
    import json

    root = _fake_repo(tmp_path / "repo", "# x\n", background)
    config = json.loads(website.stage(tmp_path / "staging", [website.LOSSES["dpo"]], root).read_text())
    titles = [next(iter(item)) for item in config["nav"]]
    assert ("Background" in titles) is background
    assert "Explorer" in titles and "Home" in titles


def test_bad_arguments_exit_2(capsys, tmp_path):
    assert website.main(["--out", str(tmp_path / "s"), "--losses", "dpo,nonsense"]) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err and "dpo" in err and "known:" in err
    assert website.main(["--out", str(ROOT)]) == 2
    assert "refusing" in capsys.readouterr().err


# ------------------------------------------------------------------------------ in Chromium


@pytest.fixture(scope="module")
def served(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # the browser closing a connection early (a page left mid-load) is not a site error

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser(served, chromium_browser):
    return chromium_browser


@pytest.fixture
def page(browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.console_errors = []
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.console_errors.append(f"page error: {e}"))
    yield pg
    context.close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


# after the load event: MathJax's first typesetting (where the page has MathJax), then two frames
# drawn, so an error it logs is seen and the screenshot shows the typeset page
_SETTLED = """async () => {
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
    await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
}"""


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)


def test_every_page_loads_and_every_link_resolves(served, page):
    todo, seen, checked = [served], set(), {}
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        page.console_errors.clear()
        response = page.goto(url)
        assert response is not None and response.ok, url
        page.wait_for_load_state("load")
        page.evaluate(_SETTLED)
        name = urllib.parse.urlparse(url).path.strip("/").replace("/", "_") or "home"
        _shot(page, f"page-{name}")
        assert not page.console_errors, (url, page.console_errors)
        sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.currentSrc, e.complete && e.naturalWidth])")
        assert all(width for _, width in sizes), (url, [s for s, w in sizes if not w])
        hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => [e.getAttribute('href'), e.href])")
        for raw, absolute in hrefs:
            parsed = urllib.parse.urlparse(absolute)
            if not absolute.startswith(served):  # only a written-out URL may leave the site
                assert raw.startswith(("http://", "https://", "mailto:")), f"{url}: link {raw!r} leaves the site"
                continue
            target = absolute.split("#", 1)[0]
            if target not in checked:
                checked[target] = _status(target)
            assert checked[target] == 200, f"{url}: link {raw!r} -> {checked[target]}"
            if parsed.path.endswith("/") or parsed.path.endswith(".html"):
                todo.append(target.split("?", 1)[0] if "explorer" not in target else target)
            if parsed.fragment and target == url.split("#", 1)[0]:
                assert page.locator(f"[id='{parsed.fragment}']").count() > 0, f"{url}: no anchor #{parsed.fragment}"
    pages = {urllib.parse.urlparse(u).path for u in seen}
    assert {"/", "/explorer/", "/docs/losses/", "/figures/", "/docs/reproductions/",
            "/docs/experiments/"} <= pages, sorted(pages)


def test_explorer_opens_dpo_with_a_trajectory(served, page):
    page.goto(served + "explorer/")
    page.wait_for_function("document.body.dataset.updates >= 1")
    assert page.input_value("#loss") == "dpo"
    state = page.evaluate("({loss: explorer.state.loss, view: explorer.state.view, beta: explorer.state.hyper.beta})")
    assert state == {"loss": "dpo", "view": "probability", "beta": 0.1}
    path = page.evaluate("explorer.trajectory()")
    assert len(path) == 201 and path[-1] != path[0]
    page.wait_for_selector("#formulas mjx-container", timeout=15_000)  # typeset by MathJax
    _shot(page, "explorer-dpo")
    assert not page.console_errors, page.console_errors


def test_url_opens_simpo_at_beta_2(served, page):
    page.goto(served + "explorer/?loss=simpo&beta=2")
    page.wait_for_function("document.body.dataset.updates >= 1")
    assert page.input_value("#loss") == "simpo"
    assert page.input_value("#hyper-beta-value") == "2"
    assert page.evaluate("explorer.state.hyper") == {"beta": 2, "simpo_gamma": 1}
    assert "beta=2" in page.url and "loss=simpo" in page.url
    page.wait_for_selector("#formulas mjx-container", timeout=15_000)
    _shot(page, "explorer-simpo-beta2")
    assert not page.console_errors, page.console_errors


def _gradlab(loss: str, view: str, x: float, y: float, values: dict) -> tuple[float, float]:
    from gradlab.symbols import VIEWS

    xname, yname = website.FIELD_VIEWS[view]
    at = {**VIEWS[view].neutral(), xname: x, yname: y}
    at = {k: at[k] for k in symbolic.variables(loss, view)}
    got = symbolic.evaluate(loss, at, values, view)
    return float(got.get(xname, 0)), float(got.get(yname, 0))


def test_control_change_updates_within_a_second_and_matches_gradlab(served, page):
    page.goto(served + "explorer/?loss=simpo")
    page.wait_for_function("document.body.dataset.updates >= 1")
    before = int(page.evaluate("document.body.dataset.updates"))
    page.fill("#hyper-beta-value", "0.5")
    page.press("#hyper-beta-value", "Enter")  # a change event, as a person typing
    page.wait_for_function(f"document.body.dataset.updates > {before}", timeout=5_000)
    ms = float(page.evaluate("document.body.dataset.updateMs"))
    print(f"explorer update after a beta change: {ms:.1f} ms (as the page reports it)")
    assert ms < 1000, f"the explorer took {ms:.0f} ms to redraw"
    assert "beta=0.5" in page.url
    for view, (x, y) in (("probability", (0.3, 0.02)), ("log", (-1.2, -3.9))):
        js = page.evaluate(f"explorer.gradient('{view}', {x}, {y})")
        ref = _gradlab("simpo", view, x, y, {"beta": 0.5})
        for a, b in zip(js, ref, strict=True):
            assert abs(a - b) <= TOLERANCE * max(1.0, abs(b)), (view, js, ref)
    # the slider moves beta through its positions: another update, another value
    before = int(page.evaluate("document.body.dataset.updates"))
    page.focus("#hyper-beta")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"document.body.dataset.updates > {before}", timeout=5_000)
    assert page.evaluate("explorer.state.hyper.beta") != 0.5
    _shot(page, "explorer-beta-changed")
    assert not page.console_errors, page.console_errors


def test_drag_moves_the_start_and_the_trajectory(served, page):
    page.goto(served + "explorer/?loss=dpo&view=log")
    page.wait_for_function("document.body.dataset.updates >= 1")
    start = page.evaluate("explorer.state.start")
    box = page.locator("#field").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.7, steps=4)
    page.mouse.up()
    moved = page.evaluate("explorer.state.start")
    assert moved != start and moved[0] < 0 and moved[1] < 0
    assert f"x={moved[0]:.4g}" in urllib.parse.unquote(page.url)
    assert page.evaluate("explorer.trajectory()")[0] == moved
    _shot(page, "explorer-dragged")
    assert not page.console_errors, page.console_errors


def test_combination_and_bad_loss(served, page):
    page.goto(served + "explorer/?loss=sigmoid:0.8,bco_pair:0.2&view=logit")
    page.wait_for_function("document.body.dataset.updates >= 1")
    assert page.input_value("#loss") == "dpo:0.8,bco_pair:0.2"
    js = page.evaluate("explorer.gradient('log', -1, -2)")
    a, b = _gradlab("dpo", "log", -1, -2, {}), _gradlab("bco_pair", "log", -1, -2, {})
    for k in range(2):
        want = 0.8 * a[k] + 0.2 * b[k]
        assert abs(js[k] - want) <= TOLERANCE * max(1.0, abs(want))
    page.fill("#loss", "print(1)")
    page.press("#loss", "Enter")
    assert "is not NAME or NAME:WEIGHT" in page.inner_text("#loss-message")
    assert page.input_value("#loss") == "dpo:0.8,bco_pair:0.2"  # the previous loss stays
    _shot(page, "explorer-combination")
    assert not page.console_errors, page.console_errors


def test_selftest_page_passes(served, page):
    page.goto(served + "explorer/selftest.html")
    page.wait_for_function("document.body.dataset.result !== undefined")
    data = page.evaluate("({...document.body.dataset})")
    _shot(page, "selftest")
    assert data["result"] == "pass", data
    # every loss, two views, three points, the default beta and one other where there is a beta
    assert int(data["checked"]) == 2 * 2 * 3 * sum(2 if "beta" in website.LOSSES[n].hyperparameters else 1
                                                   for n in LOSSES)
    assert float(data["maxError"]) <= website.SELFTEST_TOLERANCE
    assert not page.console_errors, page.console_errors
