// The explorer: a loss's descent field on the (pi(y_w), pi(y_l)) plane in three views, a
// gradient-descent trajectory from a draggable start, hyperparameter controls, the closed forms
// typeset beside the plot, and the whole state in the URL (?loss=simpo&beta=2).
"use strict";

(() => {
  const DATA = window.GRADLAB_DATA;
  const $ = (id) => document.getElementById(id);
  const VIEWS = {
    // axis ranges, and the names of the plotted coordinates
    probability: {lo: 0, hi: 1, x: "\\pi(y_w)", y: "\\pi(y_l)"},
    log: {lo: -6, hi: 0, x: "\\log\\pi(y_w)", y: "\\log\\pi(y_l)"},
    logit: {lo: 0, hi: 1, x: "\\pi(y_w)", y: "\\pi(y_l)"},
  };
  const GRID = 21;
  const START = {probability: [0.5, 0.5], log: [-1, -1], logit: [0.3, 0.3]};

  const state = {loss: "dpo", terms: null, view: "probability", hyper: {}, fixed: {}, lr: 1, steps: 200, start: null};
  let updates = 0;

  // ---------------------------------------------------------------- state <-> URL
  function readURL() {
    const q = new URLSearchParams(window.location.search);
    state.view = VIEWS[q.get("view")] ? q.get("view") : "probability";
    setLoss(q.get("loss") || "dpo", q);
    for (const name of ["q_w", "q_l", "len_w", "len_l"]) {
      const x = Number(q.get(name));
      state.fixed[name] = q.has(name) && Number.isFinite(x) && x > 0 ? x : DATA.fixed[name];
    }
    state.fixed.q_w = Math.min(state.fixed.q_w, 1);
    state.fixed.q_l = Math.min(state.fixed.q_l, 1);
    const lr = Number(q.get("lr"));
    state.lr = q.has("lr") && Number.isFinite(lr) && lr >= 0 ? lr : 1;
    const steps = Number(q.get("steps"));
    state.steps = q.has("steps") && Number.isInteger(steps) && steps >= 0 ? Math.min(steps, 5000) : 200;
    const x = Number(q.get("x"));
    const y = Number(q.get("y"));
    state.start = q.has("x") && q.has("y") && inside(state.view, x, y) ? [x, y] : START[state.view].slice();
  }

  function writeURL() {
    const q = new URLSearchParams();
    q.set("loss", state.loss);
    q.set("view", state.view);
    for (const [k, v] of Object.entries(state.hyper)) q.set(k, String(v));
    for (const [k, v] of Object.entries(state.fixed)) if (v !== DATA.fixed[k]) q.set(k, String(v));
    if (state.lr !== 1) q.set("lr", String(state.lr));
    if (state.steps !== 200) q.set("steps", String(state.steps));
    q.set("x", state.start[0].toPrecision(4));
    q.set("y", state.start[1].toPrecision(4));
    window.history.replaceState(null, "", `?${q.toString()}`);
  }

  // ---------------------------------------------------------------- loss and hyperparameters
  function legal(h, x) {
    if (!Number.isFinite(x)) return false;
    if (h.low !== null && (x < h.low || (h.low_open && x === h.low))) return false;
    if (h.high !== null && (x > h.high || (h.high_open && x === h.high))) return false;
    return true;
  }

  function setLoss(text, query) {
    let resolved;
    try {
      resolved = G.resolve(DATA, text);
      $("loss-message").textContent = "";
    } catch (err) {
      $("loss-message").textContent = `${err.message}. Showing ${state.loss} instead.`;
      if (state.terms) return false;
      resolved = G.resolve(DATA, Object.keys(DATA.losses)[0]);
    }
    state.terms = resolved.terms;
    state.loss = resolved.text;
    const old = state.hyper;
    state.hyper = {};
    for (const h of G.hypers(state.terms)) {
      const asked = query && query.has(h.name) ? Number(query.get(h.name)) : old[h.name];
      if (query && query.has(h.name) && !legal(h, asked)) {
        $("loss-message").textContent = `${h.name}=${query.get(h.name)} is outside its domain ${h.domain}; using ${h.default}.`;
      }
      state.hyper[h.name] = asked !== undefined && legal(h, asked) ? asked : h.default;
    }
    buildHyperControls();
    return true;
  }

  function nearestIndex(values, x) {
    let best = 0;
    for (let i = 1; i < values.length; i++) if (Math.abs(values[i] - x) < Math.abs(values[best] - x)) best = i;
    return best;
  }

  function buildHyperControls() {
    const box = $("hypers");
    box.replaceChildren();
    for (const h of G.hypers(state.terms)) {
      const div = document.createElement("div");
      div.className = "hyper";
      const label = document.createElement("label");
      label.textContent = `${h.name} (${h.meaning}; ${h.domain})`;
      const range = document.createElement("input");
      range.type = "range";
      range.min = "0";
      range.max = String(h.slider.length - 1);
      range.step = "1";
      range.value = String(nearestIndex(h.slider, state.hyper[h.name]));
      range.id = `hyper-${h.name}`;
      range.setAttribute("aria-label", h.name);
      const number = document.createElement("input");
      number.type = "number";
      number.step = "any";
      number.value = String(state.hyper[h.name]);
      number.id = `hyper-${h.name}-value`;
      number.setAttribute("aria-label", `${h.name} value`);
      range.addEventListener("input", () => {
        const t0 = performance.now();
        state.hyper[h.name] = h.slider[Number(range.value)];
        number.value = String(state.hyper[h.name]);
        update(t0, false);
      });
      number.addEventListener("change", () => {
        const t0 = performance.now();
        const x = Number(number.value);
        if (!legal(h, x)) {
          $("loss-message").textContent = `${h.name} must lie in ${h.domain}; ${number.value} does not.`;
          number.value = String(state.hyper[h.name]);
          return;
        }
        $("loss-message").textContent = "";
        state.hyper[h.name] = x;
        range.value = String(nearestIndex(h.slider, x));
        update(t0, false);
      });
      label.appendChild(range);
      div.append(label, number);
      box.appendChild(div);
    }
  }

  // ---------------------------------------------------------------- numbers
  function variables(x, y, view) {
    const v = Object.assign({}, DATA.fixed, state.fixed, state.hyper);
    v.ref_w = Math.log(v.q_w);
    v.ref_l = Math.log(v.q_l);
    if (view === "probability") {
      v.p_w = x;
      v.p_l = y;
    } else {
      v.lp_w = x;
      v.lp_l = y;
    }
    return v;
  }

  // The descent velocity at a point of the plotted plane, and |gradient| for the colour.
  function velocity(view, x, y) {
    if (view === "logit") {
      const g = G.partials(state.terms, "log", variables(Math.log(x), Math.log(y), "log"));
      const p = [x, y, 1 - x - y];
      return G.logitVelocity(p, G.logitGradient(p, [g[0], g[1], 0]));
    }
    const g = G.partials(state.terms, view, variables(x, y, view));
    return [-g[0], -g[1]];
  }

  function inside(view, x, y) {
    const r = VIEWS[view];
    if (!(x > r.lo && x <= r.hi && y > r.lo && y <= r.hi)) return false;
    return view !== "logit" || x + y < 1;
  }

  // Gradient descent in the view's own coordinates; stops at a non-finite gradient.
  function trajectory() {
    const view = state.view;
    const path = [state.start.slice()];
    let [x, y] = state.start;
    let z = view === "logit" ? [Math.log(x), Math.log(y), Math.log(1 - x - y)] : null;
    for (let i = 0; i < state.steps; i++) {
      if (view === "logit") {
        // log-probabilities straight from the logits (z - logsumexp z): no log of an underflowed 0
        const m = Math.max(...z);
        const lse = m + Math.log(z.reduce((a, zi) => a + Math.exp(zi - m), 0));
        const lp = z.map((zi) => zi - lse);
        const g = G.partials(state.terms, "log", variables(lp[0], lp[1], "log"));
        const dz = G.logitGradient(lp.map(Math.exp), [g[0], g[1], 0]);
        if (!dz.every(Number.isFinite)) break;
        z = z.map((zi, k) => zi - state.lr * dz[k]);
        const m2 = Math.max(...z);
        const e = z.map((zi) => Math.exp(zi - m2));
        const s = e[0] + e[1] + e[2];
        [x, y] = [e[0] / s, e[1] / s];
      } else {
        const g = G.partials(state.terms, view, variables(x, y, view));
        if (!g.every(Number.isFinite)) break;
        x -= state.lr * g[0];
        y -= state.lr * g[1];
        // probabilities stay in (0, 1], log-probabilities at or below 0
        const r = VIEWS[view];
        const floor = view === "probability" ? 1e-12 : -1e4;
        x = Math.min(Math.max(x, floor), r.hi);
        y = Math.min(Math.max(y, floor), r.hi);
      }
      path.push([x, y]);
    }
    return path;
  }

  // ---------------------------------------------------------------- drawing
  const canvas = $("field");
  const ctx = canvas.getContext("2d");
  const SIZE = 560;
  const PAD = 48;
  const scale = window.devicePixelRatio || 1;
  canvas.width = SIZE * scale;
  canvas.height = SIZE * scale;
  ctx.scale(scale, scale);

  const toPx = (view, x, y) => {
    const r = VIEWS[view];
    const w = SIZE - 2 * PAD;
    return [PAD + ((x - r.lo) / (r.hi - r.lo)) * w, SIZE - PAD - ((y - r.lo) / (r.hi - r.lo)) * w];
  };
  const fromPx = (view, px, py) => {
    const r = VIEWS[view];
    const w = SIZE - 2 * PAD;
    return [r.lo + ((px - PAD) / w) * (r.hi - r.lo), r.lo + ((SIZE - PAD - py) / w) * (r.hi - r.lo)];
  };

  // viridis at five stops, interpolated
  const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function colour(t) {
    const u = Math.min(Math.max(t, 0), 1) * (STOPS.length - 1);
    const i = Math.min(Math.floor(u), STOPS.length - 2);
    const f = u - i;
    const c = STOPS[i].map((a, k) => Math.round(a + f * (STOPS[i + 1][k] - a)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function draw(arrows, lo, hi, path) {
    const view = state.view;
    const r = VIEWS[view];
    ctx.clearRect(0, 0, SIZE, SIZE);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, SIZE, SIZE);
    // frame and ticks
    ctx.strokeStyle = "#888";
    ctx.lineWidth = 1;
    const [x0, y0] = toPx(view, r.lo, r.lo);
    const [x1, y1] = toPx(view, r.hi, r.hi);
    ctx.strokeRect(x0, y1, x1 - x0, y0 - y1);
    ctx.fillStyle = "#333";
    ctx.font = "12px sans-serif";
    for (let k = 0; k <= 4; k++) {
      const t = r.lo + (k / 4) * (r.hi - r.lo);
      const [px] = toPx(view, t, r.lo);
      const [, py] = toPx(view, r.lo, t);
      ctx.fillText(String(+t.toFixed(2)), px - 8, y0 + 16);
      ctx.fillText(String(+t.toFixed(2)), x0 - 34, py + 4);
    }
    const names = {probability: ["π(y_w)", "π(y_l)"], log: ["log π(y_w)", "log π(y_l)"], logit: ["π(y_w)", "π(y_l)"]}[view];
    ctx.fillText(names[0], (x0 + x1) / 2 - 20, SIZE - 8);
    ctx.save();
    ctx.translate(12, (y0 + y1) / 2 + 20);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(names[1], 0, 0);
    ctx.restore();
    if (view === "logit") {  // the simplex edge p_w + p_l = 1
      ctx.strokeStyle = "#bbb";
      ctx.beginPath();
      ctx.moveTo(...toPx(view, 0, 1));
      ctx.lineTo(...toPx(view, 1, 0));
      ctx.stroke();
    }
    // arrows: unit length, colour = log10 of the speed
    const cell = (SIZE - 2 * PAD) / GRID;
    for (const a of arrows) {
      const [px, py] = toPx(view, a.x, a.y);
      const n = Math.hypot(a.u, a.v);
      if (!(n > 0) || !Number.isFinite(n)) continue;
      const dx = (a.u / n) * cell * 0.42;
      const dy = (-a.v / n) * cell * 0.42;
      ctx.strokeStyle = ctx.fillStyle = colour(hi > lo ? (Math.log10(n) - lo) / (hi - lo) : 0.5);
      ctx.lineWidth = 1.6;
      ctx.beginPath();
      ctx.moveTo(px - dx, py - dy);
      ctx.lineTo(px + dx, py + dy);
      ctx.stroke();
      const ang = Math.atan2(dy, dx);
      ctx.beginPath();
      ctx.moveTo(px + dx, py + dy);
      ctx.lineTo(px + dx - 5 * Math.cos(ang - 0.45), py + dy - 5 * Math.sin(ang - 0.45));
      ctx.lineTo(px + dx - 5 * Math.cos(ang + 0.45), py + dy - 5 * Math.sin(ang + 0.45));
      ctx.closePath();
      ctx.fill();
    }
    // colour bar
    for (let k = 0; k < 100; k++) {
      ctx.fillStyle = colour(k / 99);
      ctx.fillRect(x1 + 10, y0 - (k + 1) * ((y0 - y1) / 100), 10, (y0 - y1) / 100 + 1);
    }
    ctx.fillStyle = "#333";
    ctx.font = "10px sans-serif";
    ctx.fillText(Number.isFinite(hi) ? hi.toFixed(1) : "", x1 + 8, y1 - 4);
    ctx.fillText(Number.isFinite(lo) ? lo.toFixed(1) : "", x1 + 8, y0 + 12);
    // trajectory
    ctx.strokeStyle = "#d62728";
    ctx.lineWidth = 2.2;
    ctx.beginPath();
    path.forEach(([x, y], i) => {
      const [px, py] = toPx(view, Math.max(Math.min(x, r.hi), r.lo), Math.max(Math.min(y, r.hi), r.lo));
      if (i === 0) ctx.moveTo(px, py);
      else ctx.lineTo(px, py);
    });
    ctx.stroke();
    const [sx, sy] = toPx(view, ...path[0]);
    ctx.fillStyle = "#d62728";
    ctx.beginPath();
    ctx.arc(sx, sy, 6, 0, 2 * Math.PI);
    ctx.fill();
    const [ex, ey] = toPx(view, ...path[path.length - 1].map((c) => Math.max(Math.min(c, r.hi), r.lo)));
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 1.5;
    ctx.strokeRect(ex - 4, ey - 4, 8, 8);
  }

  // ---------------------------------------------------------------- formulas
  const fmt = (w) => (w === 1 ? "" : `${w}\\,`);
  // MathJax typesets only elements of class arithmatex (the site's configuration), one formula each
  const display = (tex) => `<div class="arithmatex">\\[${tex}\\]</div>`;
  const inline = (tex) => `<span class="arithmatex">\\(${tex}\\)</span>`;
  function typesetFormulas() {
    const box = $("formulas");
    const parts = [];
    const view = state.view === "logit" ? "log" : state.view;
    const sum = (f) => state.terms.map((t) => `${fmt(t.weight)}${state.terms.length > 1 ? `\\left(${f(t.entry)}\\right)` : f(t.entry)}`).join(" + ");
    parts.push(`<h3>${state.terms.map((t) => t.entry.title).join(" + ")}</h3>`);
    parts.push(display(`\\ell = ${sum((e) => e.latex)}`));
    const v = state.terms[0].entry.views[view];
    parts.push(`<h3>${view} view</h3>`);
    parts.push(display(`\\frac{\\partial \\ell}{\\partial ${v.wrt_x}} = ${sum((e) => e.views[view].latex_x)}`));
    parts.push(display(`\\frac{\\partial \\ell}{\\partial ${v.wrt_y}} = ${sum((e) => e.views[view].latex_y)}`));
    if (state.view === "logit") {
      parts.push(`<p>Logit view: a softmax over ${inline("y_w, y_l")} and one other response, so `
        + `${inline("\\partial \\ell/\\partial z_j = g_j - \\pi_j \\sum_i g_i")} with ${inline("g")} the log-view partials `
        + `(${inline("g_3 = 0")}), and the arrows are ${inline("\\dot\\pi = -J\\,\\nabla_z \\ell")}, `
        + `${inline("J = \\operatorname{diag}(\\pi) - \\pi\\pi^\\top")}: the only view that conserves probability mass.</p>`);
    }
    const trl = state.terms.flatMap((t) => t.entry.trl.map((r) => `${r.trainer} <code>loss_type=${r.loss_type || "-"}</code>`));
    parts.push(`<p class="hint">TRL: ${trl.length ? trl.join("; ") : "no TRL trainer computes this loss"}. `
      + `The other variables are fixed at the values on the left (reference log-probabilities from ${inline("\\pi_0")}). `
      + `<a href="../docs/losses/#${state.terms[0].entry.name}">Every view in the catalogue</a>.</p>`);
    box.innerHTML = parts.join("\n");
    // MathJax loads asynchronously and typesets the page when it starts; after that, retypeset here
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      MathJax.startup.promise.then(() => {
        MathJax.typesetClear([box]);
        return MathJax.typesetPromise([box]);
      }).catch((err) => console.warn(err));
    }
  }

  // ---------------------------------------------------------------- update
  function update(t0 = performance.now(), formulas = true) {
    const view = state.view;
    const r = VIEWS[view];
    const arrows = [];
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = 0; i < GRID; i++) {
      for (let j = 0; j < GRID; j++) {
        const x = r.lo + ((i + 0.5) / GRID) * (r.hi - r.lo);
        const y = r.lo + ((j + 0.5) / GRID) * (r.hi - r.lo);
        if (!inside(view, x, y)) continue;
        const [u, v] = velocity(view, x, y);
        const n = Math.log10(Math.hypot(u, v));
        if (Number.isFinite(n)) {
          lo = Math.min(lo, n);
          hi = Math.max(hi, n);
        }
        arrows.push({x, y, u, v});
      }
    }
    const path = trajectory();
    draw(arrows, lo, hi, path);
    if (formulas) typesetFormulas();
    writeURL();
    const [sx, sy] = state.start;
    const g = view === "logit" ? velocity(view, sx, sy) : G.partials(state.terms, view, variables(sx, sy, view));
    const end = path[path.length - 1];
    $("readout").textContent = `start (${sx.toPrecision(4)}, ${sy.toPrecision(4)}): `
      + (view === "logit" ? `velocity (${g[0].toPrecision(4)}, ${g[1].toPrecision(4)})` : `gradient (${g[0].toPrecision(6)}, ${g[1].toPrecision(6)})`)
      + `; after ${path.length - 1} steps (${end[0].toPrecision(4)}, ${end[1].toPrecision(4)})`;
    $("caption").textContent = `${state.loss}, ${view} view: arrows are descent directions (unit length), colour is log10 of the speed `
      + `(${Number.isFinite(lo) ? lo.toFixed(1) : "?"} to ${Number.isFinite(hi) ? hi.toFixed(1) : "?"}); red: ${path.length - 1} steps of gradient descent.`;
    const ms = performance.now() - t0;
    updates += 1;
    document.body.dataset.updates = String(updates);
    document.body.dataset.updateMs = ms.toFixed(2);
    $("status").textContent = `updated in ${ms.toFixed(1)} ms (${arrows.length} arrows, ${path.length - 1} steps)`;
  }

  // ---------------------------------------------------------------- wiring
  function syncInputs() {
    $("loss").value = state.loss;
    $("view").value = state.view;
    for (const name of ["q_w", "q_l", "len_w", "len_l"]) $(name).value = String(state.fixed[name]);
    $("lr").value = String(state.lr);
    $("steps").value = String(state.steps);
  }

  function init() {
    const list = $("loss-names");
    for (const e of Object.values(DATA.losses)) {
      const o = document.createElement("option");
      o.value = e.name;
      o.label = e.title;
      list.appendChild(o);
    }
    readURL();
    syncInputs();
    $("loss").addEventListener("change", () => {
      const t0 = performance.now();
      if (setLoss($("loss").value, null)) update(t0);
      $("loss").value = state.loss;
    });
    $("view").addEventListener("change", () => {
      const t0 = performance.now();
      state.view = $("view").value;
      if (!inside(state.view, ...state.start)) state.start = START[state.view].slice();
      update(t0);
    });
    for (const name of ["q_w", "q_l", "len_w", "len_l"]) {
      $(name).addEventListener("change", () => {
        const t0 = performance.now();
        const x = Number($(name).value);
        const ok = Number.isFinite(x) && x > 0 && (!name.startsWith("q") || x <= 1);
        if (!ok) {
          $("loss-message").textContent = `${name} must be ${name.startsWith("q") ? "in (0, 1]" : "positive"}.`;
          $(name).value = String(state.fixed[name]);
          return;
        }
        state.fixed[name] = x;
        update(t0, false);
      });
    }
    $("lr").addEventListener("change", () => {
      const x = Number($("lr").value);
      if (Number.isFinite(x) && x >= 0) state.lr = x;
      $("lr").value = String(state.lr);
      update(performance.now(), false);
    });
    $("steps").addEventListener("change", () => {
      const x = Number($("steps").value);
      if (Number.isInteger(x) && x >= 0 && x <= 5000) state.steps = x;
      $("steps").value = String(state.steps);
      update(performance.now(), false);
    });
    let dragging = false;
    const move = (ev) => {
      const t0 = performance.now();
      const rect = canvas.getBoundingClientRect();
      const [x, y] = fromPx(state.view, ((ev.clientX - rect.left) * SIZE) / rect.width, ((ev.clientY - rect.top) * SIZE) / rect.height);
      if (!inside(state.view, x, y)) return;
      state.start = [x, y];
      update(t0, false);
    };
    canvas.addEventListener("pointerdown", (ev) => {
      dragging = true;
      canvas.setPointerCapture(ev.pointerId);
      move(ev);
    });
    canvas.addEventListener("pointermove", (ev) => dragging && move(ev));
    canvas.addEventListener("pointerup", () => (dragging = false));
    update();
  }

  // for the tests and the curious: the numbers behind the picture
  window.explorer = {
    state,
    gradient: (view, x, y) => G.partials(state.terms, view, variables(x, y, view)),
    velocity: (x, y) => velocity(state.view, x, y),
    trajectory,
  };
  init();
})();
