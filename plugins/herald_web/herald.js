// The herald "Notifications" page: fetches api/stats and api/failed (same origin; the Airflow UI's
// `_token` cookie authenticates) every 15 seconds and draws them. Data is only ever inserted as text
// (textContent), never as HTML: trigger types and reasons come from the application's data.
(() => {
  "use strict";

  const REFRESH_MS = 15000;
  const FAILED_SHOWN = 15;
  // Relative to the page, so a deployment under a base URL path (/airflow/herald/) works as well.
  const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const OUTCOMES = [
    ["delivered", "delivered"],
    ["skipped_preference", "skipped (preference)"],
    ["rate_limited", "rate-limited"],
    ["digested", "digested"],
    ["failed", "failed"],
  ];

  const $ = (id) => document.getElementById(id);
  const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const setText = (id, text) => { $(id).textContent = text; };

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.floor(seconds);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
    return Math.floor(s / 86400) + "d " + String(Math.floor((s % 86400) / 3600)).padStart(2, "0") + "h";
  }

  function duration(run) {
    if (run.running) return "running";
    if (run.duration_seconds === null) return "–";
    return run.duration_seconds < 60 ? run.duration_seconds.toFixed(1) + "s" : age(run.duration_seconds);
  }

  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    const sameDay = d.toDateString() === new Date().toDateString();
    const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
    return sameDay ? time : d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
  }

  async function getJSON(path) {
    const response = await fetch(BASE + path, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    });
    if (response.status === 401 || response.status === 403) {
      throw new Error("not signed in to Airflow (HTTP " + response.status + "); sign in again");
    }
    if (!response.ok) {
      let detail = "";
      try { detail = (await response.json()).detail || ""; } catch (_) { /* not JSON */ }
      throw new Error("HTTP " + response.status + (detail ? ": " + detail : ""));
    }
    return response.json();
  }

  // ------------------------------------------------------------------------------------------ figures

  function renderFigures(s) {
    setText("backlog-total", fmt(s.backlog.total));
    setText("backlog-normal", fmt(s.backlog.normal));
    setText("backlog-urgent", fmt(s.backlog.urgent));
    setText("age-normal", age(s.oldest_pending_age_seconds.normal));
    setText("age-urgent", age(s.oldest_pending_age_seconds.urgent));
    const lane = s.urgent_latency_last_hour;
    setText("urgent-p50", lane.p50_seconds === null ? "–" : lane.p50_seconds.toFixed(1) + " s");
    setText("urgent-p95", lane.p95_seconds === null ? "–" : lane.p95_seconds.toFixed(1) + " s");
    setText("urgent-count", fmt(lane.triggers));
    setText("claims-held", fmt(s.claims.held));
    setText("claims-expired", fmt(s.claims.expired));
    setText("hour-delivered", fmt(s.throughput.last_hour.notifications_delivered));
    setText("hour-processed", fmt(s.throughput.last_hour.triggers_processed));
    setText("day-delivered", fmt(s.throughput.last_24h.notifications_delivered));
    setText("day-processed", fmt(s.throughput.last_24h.triggers_processed));
    setText("day-failed", fmt(s.throughput.last_24h.triggers_failed));
    const c = s.cache;
    setText("cache-ratio", c.hit_ratio === null ? "–" : (c.hit_ratio * 100).toFixed(1) + "%");
    setText("cache-detail", c.available ? "hits " + fmt(c.hits) + " · misses " + fmt(c.misses) : "Redis not reachable");
  }

  function renderOutcomes(outcomes) {
    const bar = $("outcome-bar");
    const legend = $("outcome-legend");
    bar.replaceChildren();
    legend.replaceChildren();
    const total = OUTCOMES.reduce((sum, [key]) => sum + (outcomes[key] || 0), 0);
    for (const [key, label] of OUTCOMES) {
      const n = outcomes[key] || 0;
      if (total && n) {
        const seg = document.createElement("span");
        seg.style.width = (100 * n) / total + "%";
        seg.style.background = "var(--" + key + ")";
        seg.title = label + ": " + fmt(n);
        bar.append(seg);
      }
      const item = document.createElement("li");
      item.id = "outcome-" + key;
      item.style.setProperty("--swatch", "var(--" + key + ")");
      item.textContent = label + " " + fmt(n);
      legend.append(item);
    }
  }

  // ----------------------------------------------------------------------------------- executor queues

  // Under the LocalExecutor there are no queues: say so instead of showing zeros.
  function renderExecutor(ex) {
    const note = $("queues-note");
    const table = $("queues-table");
    const show = (text, bad) => {
      note.hidden = !text;
      note.textContent = text || "";
      note.className = "note" + (bad ? " bad" : "");
    };
    if (!ex) {
      setText("executor-name", "");
      show("executor statistics unavailable (see the API server's log)", true);
      table.hidden = true;
      return;
    }
    setText("executor-name", ex.executor);
    if (!ex.has_queues) {
      show(ex.note, false);
      table.hidden = true;
      return;
    }
    table.hidden = false;
    show(ex.broker_error ? "broker unreachable (" + ex.broker_error + "): waiting messages and workers unknown" : "", true);
    fillTable($("queues"), ex.queues, [
      [(q) => q.name, (q) => "queue" + (q.name === "urgent" ? " urgent" : "")],
      [(q) => fmt(q.waiting_in_broker), "num"],
      [(q) => (q.workers.length ? q.workers.join(", ") : "none: nothing consumes this queue"),
        (q) => (q.workers.length ? "workers" : "workers alert")],
      [(q) => fmt(q.queued_task_instances), "num"],
      [(q) => age(q.oldest_queued_age_seconds), (q) => "num" + (q.oldest_queued_age_seconds > 60 ? " alert" : "")],
    ], "no queues");
    for (const [i, q] of ex.queues.entries()) {
      $("queues").children[i].id = "queue-" + q.name;
    }
  }

  // ------------------------------------------------------------------------------------------- charts

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function hourLabel(iso) {
    return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  }

  // Bars of points[barKey] per bucket; optionally a line of points[lineKey] on the same scale.
  function drawChart(svg, points, barKey, barClass, lineKey) {
    const W = Math.max(svg.clientWidth || 480, 240);
    const H = svg.clientHeight || 180;
    const left = 44, right = 8, top = 20, bottom = 22;
    const plotW = W - left - right, plotH = H - top - bottom;
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.replaceChildren();
    const values = points.map((p) => p[barKey] || 0);
    const lineValues = lineKey ? points.map((p) => p[lineKey]) : [];
    const max = niceMax(Math.max(0, ...values, ...lineValues.filter((v) => v !== null)));
    const y = (v) => top + plotH - (v / max) * plotH;
    const step = plotW / Math.max(points.length, 1);

    for (const f of [0, 0.5, 1]) {
      const v = max * f;
      svg.append(el("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
      svg.append(el("text", { x: left - 6, y: y(v) + 3, "text-anchor": "end" }, fmt(Math.round(v))));
    }
    points.forEach((p, i) => {
      const v = p[barKey] || 0;
      const h = Math.max(0, top + plotH - y(v));
      const rect = el("rect", {
        class: barClass, x: left + i * step + step * 0.15, y: top + plotH - h,
        width: Math.max(step * 0.7, 1), height: h, rx: 1.5,
      });
      const tip = hourLabel(p.start) + ": " + fmt(v) + " (" + fmt(p.runs) + " runs)" +
        (lineKey && p[lineKey] !== null ? ", backlog " + fmt(p[lineKey]) : "");
      rect.append(el("title", {}, tip));
      svg.append(rect);
      if (i % 6 === 0) {
        svg.append(el("text", { x: left + i * step + step / 2, y: H - 6, "text-anchor": "middle" }, hourLabel(p.start)));
      }
    });
    if (lineKey) {
      const pts = [];
      points.forEach((p, i) => { if (p[lineKey] !== null && p[lineKey] !== undefined) pts.push([left + i * step + step / 2, y(p[lineKey]), p[lineKey]]); });
      if (pts.length > 1) {
        svg.append(el("polyline", { class: "line-backlog", points: pts.map(([px, py]) => px + "," + py).join(" ") }));
      }
      for (const [px, py, v] of pts) {
        const dot = el("circle", { class: "pt-backlog", cx: px, cy: py, r: 3 });
        dot.append(el("title", {}, "backlog " + fmt(v)));
        svg.append(dot);
      }
      const last = pts[pts.length - 1];
      if (last) {
        svg.append(el("text", { class: "now", x: W - right, y: 11, "text-anchor": "end" }, "backlog now " + fmt(last[2])));
      }
    }
  }

  // ------------------------------------------------------------------------------------------- tables

  function fillTable(tbody, rows, columns, emptyText) {
    tbody.replaceChildren();
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = columns.length;
      td.className = "empty";
      td.textContent = emptyText;
      tr.append(td);
      tbody.append(tr);
      return;
    }
    for (const row of rows) {
      const tr = document.createElement("tr");
      for (const [value, cls] of columns) {
        const td = document.createElement("td");
        td.textContent = value(row);
        const c = typeof cls === "function" ? cls(row) : cls;
        if (c) td.className = c;
        tr.append(td);
      }
      tbody.append(tr);
    }
  }

  function renderRuns(runs) {
    fillTable($("runs"), runs, [
      [(r) => r.run_id + (r.dry_run ? " (dry run)" : ""), "run"],
      [(r) => r.mode],
      [(r) => when(r.started_at)],
      [duration, "num"],
      [(r) => fmt(r.triggers), "num"],
      [(r) => fmt(r.counts.delivered), "num"],
      [(r) => fmt(r.counts.triggers_failed), "num"],
    ], "no runs yet");
  }

  function renderFailed(triggers) {
    fillTable($("failed"), triggers, [
      [(t) => String(t.id), "num"],
      [(t) => t.trigger_type],
      [(t) => t.priority, (t) => (t.priority === "urgent" ? "urgent" : "")],
      [(t) => when(t.created_at)],
      [(t) => t.last_error || "–", "reason"],
    ], "no failed triggers");
  }

  // ------------------------------------------------------------------------------------------ refresh

  let latest = null;

  function draw() {
    if (!latest) return;
    drawChart($("chart-triggers"), latest.series.points, "triggers_processed", "bar-processed", "backlog");
    drawChart($("chart-delivered"), latest.series.points, "delivered", "bar-delivered", null);
  }

  function setStatus(ok, text) {
    $("status-dot").className = "dot " + (ok ? "ok" : "bad");
    setText("status", text);
    document.body.dataset.state = ok ? "ok" : "error";
  }

  async function refresh() {
    try {
      const [stats, failed] = await Promise.all([getJSON("api/stats"), getJSON("api/failed?limit=" + FAILED_SHOWN)]);
      latest = stats;
      renderFigures(stats);
      renderExecutor(stats.executor);
      renderOutcomes(stats.outcomes_last_hour);
      renderRuns(stats.recent_runs);
      renderFailed(failed.triggers);
      draw();
      setStatus(true, "updated " + new Date().toLocaleTimeString([], { hourCycle: "h23" }) + " · refreshes every " + REFRESH_MS / 1000 + " s");
    } catch (err) {
      setStatus(false, "could not refresh: " + err.message);
    } finally {
      setTimeout(refresh, REFRESH_MS);
    }
  }

  window.addEventListener("resize", draw);
  refresh();
})();
