// Compares the explorer's numbers with gradlab's exported values; the verdict goes into
// document.body.dataset (result, checked, failed, maxError) for the browser tests.
"use strict";

(() => {
  const DATA = window.GRADLAB_DATA;
  const {tolerance, records} = window.GRADLAB_SELFTEST;
  const rows = document.getElementById("rows");
  let failed = 0;
  let checked = 0;
  let maxError = 0;
  for (const rec of records) {
    const entry = DATA.losses[rec.loss];
    const v = Object.assign({}, rec.at);
    for (const h of entry.hyper) v[h.name] = h.name in rec.values ? rec.values[h.name] : h.default;
    const got = G.partials([{entry, weight: 1}], rec.view, v);
    [["x", got[0], rec.dx], ["y", got[1], rec.dy]].forEach(([axis, js, ref]) => {
      const err = Math.abs(js - ref) / Math.max(1, Math.abs(ref));
      const ok = Number.isFinite(js) && err <= tolerance;
      checked += 1;
      failed += ok ? 0 : 1;
      maxError = Math.max(maxError, Number.isFinite(err) ? err : Infinity);
      const tr = document.createElement("tr");
      if (!ok) tr.className = "fail";
      const wrt = entry.views[rec.view][axis];
      const point = Object.entries(rec.at).filter(([k]) => /^(p|lp)_/.test(k)).map(([k, x]) => `${k}=${x.toPrecision(4)}`).join(", ");
      const hyper = entry.hyper.map((h) => `${h.name}=${v[h.name]}`).join(", ");
      for (const text of [rec.loss, rec.view, point, hyper, `d/d${wrt}`, js.toPrecision(17), ref.toPrecision(17), err.toExponential(2)]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      }
      rows.appendChild(tr);
    });
  }
  const pass = failed === 0 && checked > 0;
  document.getElementById("summary").innerHTML = `<strong>${pass ? "PASS" : "FAIL"}</strong>: ${checked} values checked, `
    + `${failed} failed, largest relative error ${maxError.toExponential(2)} (tolerance ${tolerance}).`;
  Object.assign(document.body.dataset, {result: pass ? "pass" : "fail", checked: String(checked), failed: String(failed), maxError: String(maxError)});
})();
