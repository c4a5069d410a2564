// Live loss and learning-rate curves: polls /api/runs/NAME/metrics?after=STEP and redraws two SVG
// polylines. Hand-written (no charting library) so the dashboard has no external asset to fetch.
(function () {
  "use strict";
  const box = document.getElementById("curves");
  if (!box) return;
  const run = box.dataset.run;
  const rows = [];
  const W = 480, H = 200, PAD = 34;

  function draw(id, key) {
    const svg = document.getElementById(id);
    const pts = rows.filter((r) => Number.isFinite(r[key]));
    svg.replaceChildren();
    if (!pts.length) return;
    const xs = pts.map((r) => r.step), ys = pts.map((r) => r[key]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const sx = (x) => PAD + ((x - x0) / (x1 - x0)) * (W - PAD - 8);
    const sy = (y) => H - 18 - ((y - y0) / (y1 - y0)) * (H - 30);
    const ns = "http://www.w3.org/2000/svg";
    const add = (tag, attrs, text) => {
      const el = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
      if (text !== undefined) el.textContent = text;
      svg.appendChild(el);
      return el;
    };
    add("line", { x1: PAD, y1: H - 18, x2: W - 8, y2: H - 18 });
    add("line", { x1: PAD, y1: 8, x2: PAD, y2: H - 18 });
    add("text", { x: 2, y: 14 }, y1.toPrecision(3));
    add("text", { x: 2, y: H - 20 }, y0.toPrecision(3));
    add("text", { x: PAD, y: H - 4 }, "step " + x0);
    add("text", { x: W - 60, y: H - 4 }, "step " + Math.max(...xs));
    add("polyline", { points: pts.map((r) => sx(r.step) + "," + sy(r[key])).join(" ") })
      .setAttribute("data-points", pts.length);
  }

  async function poll() {
    const after = rows.length ? rows[rows.length - 1].step : 0;
    let data;
    try {
      const res = await fetch("/api/runs/" + encodeURIComponent(run) + "/metrics?after=" + after,
                              { credentials: "same-origin" });
      data = await res.json();
    } catch (e) {
      setTimeout(poll, 3000);
      return;
    }
    if (data.rows.length) {
      rows.push(...data.rows);
      draw("loss-curve", "loss");
      draw("lr-curve", "lr");
      document.getElementById("last-step").textContent = rows[rows.length - 1].step;
    }
    const status = document.getElementById("status").textContent;
    const stage = document.getElementById("stage").textContent;
    if (status !== data.status || stage !== data.stage) {
      location.reload(); // a stage finished or the run ended: the tables and buttons are stale
      return;
    }
    if (data.status === "running") setTimeout(poll, 1000);
  }
  poll();
})();
