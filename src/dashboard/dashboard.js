// Live figures: the server sends the fleet's counts and the rollouts'
// progress when they change, at most twice a second; elements say which
// figure they show (data-live: a path in `status`; data-rollout + data-field:
// a path in that rollout's row; data-status: a path in the status of the
// rollout whose page this is). Only textContent is set: nothing received is
// ever parsed as HTML.
(function () {
  "use strict";
  if (!window.EventSource) return;
  function at(obj, path) {
    return path.split(".").reduce(function (o, k) {
      return o == null ? undefined : o[k];
    }, obj);
  }
  function show(v) {
    return v === undefined || v === null || v === "" ? "—" : String(v);
  }
  // A rollout's page names it: its waves and health gate come along.
  var page = document.body.getAttribute("data-rollout-page");
  var source = new EventSource(page ? "/events?rollout=" + encodeURIComponent(page) : "/events");
  source.onmessage = function (e) {
    var f;
    try { f = JSON.parse(e.data); } catch (_) { return; }
    document.querySelectorAll("[data-live]").forEach(function (el) {
      el.textContent = show(at(f.status, el.getAttribute("data-live")));
    });
    var rows = {};
    (f.rollouts || []).forEach(function (r) { rows[r.name] = r; });
    document.querySelectorAll("[data-rollout]").forEach(function (el) {
      var r = rows[el.getAttribute("data-rollout")];
      if (!r) return;
      if (el.hasAttribute("data-bar")) {
        var done = at(r, "counts.succeeded") || 0;
        var pct = r.devices ? Math.round(done * 100 / r.devices) : 0;
        el.style.width = pct + "%";
      } else {
        var v = at(r, el.getAttribute("data-field"));
        el.textContent = show(v === undefined && el.getAttribute("data-field").indexOf("counts.") === 0 ? 0 : v);
      }
    });
    if (f.rollout) {
      document.querySelectorAll("[data-status]").forEach(function (el) {
        var v = at(f.rollout, el.getAttribute("data-status"));
        el.textContent = v !== null && typeof v === "object" ? JSON.stringify(v) : show(v);
      });
    }
    document.body.setAttribute("data-updated", String(Date.now()));
  };
})();
