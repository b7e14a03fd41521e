// The numeric kernel shared by the explorer and its self-test: the stable special functions the
// generated closed forms call (the same forms as gradlab's numpy backend), and the evaluation of
// one loss's (or one weighted combination's) axis partials. No string is ever evaluated.
"use strict";

const G = (() => {
  // log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|), numpy's logaddexp(0, x)
  const softplus = (x) => Math.max(x, 0) + Math.log1p(Math.exp(-Math.abs(x)));
  // sigma(x) = exp(-softplus(-x)): no overflow at either end
  const sigmoid = (x) => Math.exp(-softplus(-x));
  // log(1 - e^x) for x < 0, Maechler's split: log(-expm1(x)) near 0, log1p(-e^x) below -log 2
  const log1mexp = (x) => (x > -Math.LN2 ? Math.log(-Math.expm1(x)) : Math.log1p(-Math.exp(x)));
  const heaviside = (x, h0 = 0.5) => (x > 0 ? 1 : x < 0 ? 0 : h0);

  // A registered name, alias or TRL key (any case, '-' read as '_'), or a weighted combination
  // "NAME:WEIGHT,NAME,..." (a missing weight is 1), as gradlab reads them. Returns
  // {terms: [{entry, weight}], text} or throws an Error that says what is allowed.
  function resolve(data, text) {
    const index = {};
    for (const entry of Object.values(data.losses)) {
      for (const n of [entry.name, ...entry.aliases, ...entry.trl.map((r) => r.key)]) {
        index[n.toLowerCase().replace(/-/g, "_")] = entry;
      }
    }
    const items = String(text).split(",").map((s) => s.trim()).filter((s) => s.length);
    if (!items.length) throw new Error("type a loss name");
    const terms = items.map((item) => {
      const m = /^([A-Za-z0-9_.\-]+)\s*(?::\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?))?$/.exec(item);
      if (!m) throw new Error(`'${item}' is not NAME or NAME:WEIGHT (a weight is a plain number)`);
      const entry = index[m[1].toLowerCase().replace(/-/g, "_")];
      if (!entry) throw new Error(`unknown loss '${m[1]}'; this site knows: ${Object.keys(data.losses).join(", ")}`);
      return {entry, weight: m[2] === undefined ? 1 : Number(m[2])};
    });
    return {terms, text: terms.map((t) => (t.weight === 1 ? t.entry.name : `${t.entry.name}:${t.weight}`)).join(",")};
  }

  // The hyperparameters of a combination: shared by name, the first term's default (as in TRL's config).
  function hypers(terms) {
    const out = [];
    const seen = new Set();
    for (const t of terms) {
      for (const h of t.entry.hyper) {
        if (!seen.has(h.name)) {
          seen.add(h.name);
          out.push(h);
        }
      }
    }
    return out;
  }

  // (dl/dx, dl/dy) of a combination in a closed-form view at the variables v.
  function partials(terms, view, v) {
    let dx = 0;
    let dy = 0;
    for (const t of terms) {
      const f = t.entry.views[view];
      dx += t.weight * f.dx(v);
      dy += t.weight * f.dy(v);
    }
    return [dx, dy];
  }

  // Logit view: a single-context softmax over (y_w, y_l, other). The gradient on the logits is
  // J^T g with g the log-view partials and J = diag(p) - p p^T (symmetric), so dz = g - p sum(g).
  function logitGradient(p, g) {
    const s = g[0] + g[1] + g[2];
    return [g[0] - p[0] * s, g[1] - p[1] * s, g[2] - p[2] * s];
  }

  // The velocity of p under a descent step on the logits: dp = -J dz.
  function logitVelocity(p, dz) {
    const pdz = p[0] * dz[0] + p[1] * dz[1] + p[2] * dz[2];
    return [-(p[0] * dz[0] - p[0] * pdz), -(p[1] * dz[1] - p[1] * pdz)];
  }

  return {softplus, sigmoid, log1mexp, heaviside, resolve, hypers, partials, logitGradient, logitVelocity};
})();
