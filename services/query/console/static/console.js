// scoremesh console: draws the page's charts from its JSON block and keeps them live.
(function () {
  "use strict";

  function options(el) {
    var o = { points: false, curve: false, legend: "bottom", empty: "no windows yet", download: false };
    if (el.dataset.ytitle) o.ytitle = el.dataset.ytitle;
    if (el.dataset.min !== undefined) o.min = Number(el.dataset.min);
    if (el.dataset.max !== undefined) o.max = Number(el.dataset.max);
    return o;
  }

  function draw() {
    var block = document.getElementById("chart-data");
    if (!block || typeof Chartkick === "undefined") return;
    var data = JSON.parse(block.textContent);
    var charts = {};
    document.querySelectorAll("[data-chart]").forEach(function (el) {
      var key = el.dataset.chart;
      charts[key] = new Chartkick.LineChart(el, data[key] || [], options(el));
    });
    window.scoremeshCharts = charts;
    var src = block.dataset.src;
    var every = Number(block.dataset.refresh || "0") * 1000;
    if (!src || !every) return;
    setInterval(function () {
      if (document.hidden) return;
      fetch(src, { credentials: "same-origin", headers: { accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (body) {
          if (!body) return;
          Object.keys(charts).forEach(function (key) {
            charts[key].updateData(body.data[key] || []);
          });
          var note = document.getElementById("history-note");
          if (note && !body.note) note.remove();
        })
        .catch(function () { /* the next tick tries again */ });
    }, every);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", draw);
  else draw();
})();
