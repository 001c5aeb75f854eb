// flux web UI: plain JavaScript, no framework, nothing fetched but fluxd's read-only API.
//
// Routes (in the hash, so the server only ever serves one page):
//   #/                              the services
//   #/service/NAME?group=G&scope=S  one service: its instances and live charts, G one of
//                                   instance, image, tag, host, label:KEY
//
// Every view polls every 2 s. When a fetch fails (fluxd stopped), the last data stays on screen
// and #stale says since when it is old. While fluxd's store is down, fluxd still answers from the
// catalog as last followed, and #store-stale says since when.
//
// Hooks for tests and scripts (stable ids, classes and data attributes):
//   body[data-page]                 "list" or "service"
//   body[data-last-ok]              unix ms of the last successful update
//   #stale[data-last-ok]            shown while the latest fetch failed
//   #store-stale[data-since]        shown while fluxd's store is unreachable (unix ms)
//   #services tr[data-service]      one row per service, with data-total and data-live
//   .refused[data-refused]          in a service's row and on its page (#refused) when this
//                                   host does not route it (VIP guard); data-refused = reason
//   #forwarding                     on a service's page when the kernel forwards it
//   #instances tr[data-instance]    one row per instance, with data-state
//   .note[data-note]                in an instance's state cell: why it has no address, or an
//                                   unusual one (the agent's container.address_note)
//   .drained[data-drained]          in a drained instance's state cell (fluxctl instance drain)
//   #rules li[data-weight]          a rule's weight, once some rule of the service sets one
//   #traffic                        on a service's page: its locality and affinity, if not default
//   #group                          the group-by <select>
//   #scope                          "host" (this fluxd's clients) or "cluster" (every host's)
//   #hosts-status span[data-host]   in the cluster view, one per host, data-ok true/false
//   #legend li[data-series-key=K]   one per chart line, data-last-value = latest connections/s
//                                   (also data-last-bytes, -errors, -p50, -p99, -active, data-points;
//                                   for http services -requests, -2xx .. -5xx, -req-p50, -req-p99)
//   .chart[data-metric=M] path.line[data-series-key=K]
//                                   http services add the charts requests_per_s, status (lines
//                                   also carry data-class=2xx..5xx) and request_latency
"use strict";

(function () {
  const POLL_MS = 2000;
  const FETCH_TIMEOUT_MS = 5000;
  const PALETTE = [
    "#1f6feb", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8590c", "#0c8599",
    "#c2255c", "#5c940d", "#364fc7", "#868e96", "#f08c00", "#087f5b",
  ];
  const GROUPS = ["instance", "image", "tag", "host"];
  const CHARTS = [
    { metric: "connections_per_s", title: "Connections", unit: "/s", fmt: fmtRate },
    { metric: "bytes_per_s", title: "Bytes", unit: "/s", fmt: fmtBytes },
    { metric: "errors_per_s", title: "Connect errors", unit: "/s", fmt: fmtRate },
    { metric: "latency", title: "Connect latency", unit: "p50 solid, p99 dashed", fmt: fmtMs },
  ];
  // `http` services: per-request charts first, then the connection charts (instance side).
  const HTTP_CHARTS = [
    { metric: "requests_per_s", title: "Requests", unit: "/s", fmt: fmtRate },
    { metric: "status", title: "Responses by status class", unit: "/s; 2xx solid, 3xx dotted, 4xx dashed, 5xx dash-dot", fmt: fmtRate },
    { metric: "request_latency", title: "Request latency", unit: "p50 solid, p99 dashed", fmt: fmtMs },
  ];
  const CLASSES = ["2xx", "3xx", "4xx", "5xx"];
  // What `--forward kernel` means for what the pages can show.
  const KERNEL_NOTE = "iptables DNAT straight to a live instance: no connect retry, and no per-connection counts or charts (fluxd never sees the connections)";

  // What the current view shows; `gen` ignores answers to polls of a previous view.
  const view = { gen: 0, timer: null, route: null, lastOk: 0, services: null, info: null, series: null };

  // ---------- small DOM helpers (textContent only: names and labels come from containers) ----

  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    append(e, children);
    return e;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const e = document.createElementNS(SVG_NS, tag);
    setAttrs(e, attrs);
    append(e, children);
    return e;
  }

  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") e.textContent = String(v);
      else if (k === "onchange" || k === "onclick") e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function append(e, children) {
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
  }

  function replace(id, ...children) {
    const e = document.getElementById(id);
    e.replaceChildren();
    append(e, children);
    return e;
  }

  // ---------- formatting ----------

  function fmtRate(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    if (v === 0) return "0";
    if (Math.abs(v) >= 100) return v.toFixed(0);
    if (Math.abs(v) >= 10) return v.toFixed(1).replace(/\.0$/, "");
    return v.toFixed(2).replace(/\.?0+$/, "");
  }

  function fmtBytes(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return fmtRate(v) + " " + units[i];
  }

  function fmtMs(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    if (v === 0) return "0";
    return (v >= 10 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2)) + " ms";
  }

  // A service without a VIP is one only `fluxd edge` publishes.
  function addressText(address) {
    return address === "none" ? "none (edge only)" : address;
  }

  function fmtTime(ms) {
    if (!ms) return "–";
    const d = new Date(ms);
    const p = (n) => String(n).padStart(2, "0");
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function fmtAgo(ms) {
    if (!ms) return "never";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    const ago = s < 90 ? s + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
    return fmtTime(ms) + " (" + ago + ")";
  }

  // ---------- routing ----------

  function parseRoute() {
    const raw = location.hash.replace(/^#/, "") || "/";
    const q = raw.indexOf("?");
    const path = q < 0 ? raw : raw.slice(0, q);
    const params = new URLSearchParams(q < 0 ? "" : raw.slice(q + 1));
    const segs = path.split("/").filter(Boolean).map(decodeURIComponent);
    if (segs[0] === "service" && segs[1]) {
      return {
        page: "service",
        service: segs[1],
        group: params.get("group") || "instance",
        scope: params.get("scope") === "cluster" ? "cluster" : "host",
      };
    }
    return { page: "list" };
  }

  function serviceHref(name, group, scope) {
    const q = new URLSearchParams();
    if (group && group !== "instance") q.set("group", group);
    if (scope === "cluster") q.set("scope", "cluster");
    const qs = q.toString();
    return "#/service/" + encodeURIComponent(name) + (qs ? "?" + qs : "");
  }

  function start() {
    clearTimeout(view.timer);
    view.gen++;
    view.route = parseRoute();
    const r = view.route;
    // Keep the data of the same service when only the grouping changes.
    if (!(r.page === "service" && view.info && view.info.name === r.service)) {
      view.info = null;
    }
    view.series = null;
    document.body.dataset.page = r.page;
    if (r.page === "service") {
      replace("crumbs", h("a", { href: "#/", text: "services" }), " / ", h("span", { text: r.service }));
      document.title = r.service + " · flux";
    } else {
      replace("crumbs", h("a", { href: "#/", text: "services" }));
      document.title = "flux";
    }
    render();
    poll(view.gen);
  }

  // ---------- fetching ----------

  async function getJSON(url) {
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const resp = await fetch(url, { cache: "no-store", signal: ctl.signal });
      if (!resp.ok) {
        let msg = "HTTP " + resp.status;
        try { msg += ": " + (await resp.json()).error; } catch (_) { /* not JSON */ }
        const err = new Error(msg);
        err.status = resp.status;
        throw err;
      }
      return await resp.json();
    } finally {
      clearTimeout(t);
    }
  }

  async function poll(gen) {
    const r = view.route;
    try {
      if (r.page === "service") {
        const q = "service=" + encodeURIComponent(r.service) + "&group=" + encodeURIComponent(r.group) +
          (r.scope === "cluster" ? "&scope=cluster" : "");
        const [info, series, host] = await Promise.all([
          getJSON("/v1/services/" + encodeURIComponent(r.service)),
          getJSON("/v1/series?" + q),
          getJSON("/v1/host"),
        ]);
        if (gen !== view.gen) return;
        view.info = info;
        view.series = series;
        setStoreStale(host.store);
      } else {
        const [services, host] = await Promise.all([getJSON("/v1/services"), getJSON("/v1/host")]);
        if (gen !== view.gen) return;
        view.services = services;
        setStoreStale(host.store);
      }
      view.lastOk = Date.now();
      setStale(null);
      render();
    } catch (e) {
      if (gen !== view.gen) return;
      setStale(e);
      if (!hasData()) render();
    } finally {
      if (gen === view.gen) view.timer = setTimeout(() => poll(gen), POLL_MS);
    }
  }

  function hasData() {
    return view.route.page === "service" ? !!view.info : !!view.services;
  }

  function setStale(err) {
    const st = document.getElementById("stale");
    const up = document.getElementById("updated");
    if (view.lastOk) {
      document.body.dataset.lastOk = String(view.lastOk);
      up.textContent = "updated " + fmtTime(view.lastOk);
    }
    if (!err) {
      st.hidden = true;
      document.body.classList.remove("is-stale");
      return;
    }
    const why = err.status ? String(err.message)
      : err.name === "AbortError" ? "fluxd did not answer in time" : "fluxd unreachable";
    st.hidden = false;
    st.dataset.lastOk = String(view.lastOk || 0);
    st.dataset.error = why;
    st.textContent = view.lastOk
      ? "stale: " + why + "; showing data from " + fmtTime(view.lastOk)
      : why + "; no data yet";
    st.title = why;
    document.body.classList.add("is-stale");
  }

  // fluxd answers, but its store does not: metrics are live, the service and instance lists
  // are as fluxd last saw them. Said once, in the header, rather than as an error.
  function setStoreStale(store) {
    const st = document.getElementById("store-stale");
    if (!store || store.reachable) {
      st.hidden = true;
      return;
    }
    st.hidden = false;
    st.dataset.since = String(store.unreachable_since_ms || 0);
    st.textContent = "store unreachable since " + fmtTime(store.unreachable_since_ms) +
      "; services and instances as last seen";
  }

  // ---------- views ----------

  // In the cluster view, which hosts answered: each line's key starts with the host that saw
  // the traffic, and a host that did not answer is named with the reason.
  function hostsStatus(series) {
    const hosts = (series && series.hosts) || [];
    return h("span", {}, ...hosts.map((x) => h("span", {
      class: "host-status", "data-host": x.name, "data-ok": String(!!x.ok),
      title: x.error || "", text: x.ok ? x.name + " ✓ " : x.name + " ✗ (" + x.error + ") ",
    })));
  }

  function render() {
    if (view.route.page === "service") renderService();
    else renderList();
  }

  // The active health check's verdict in words, as fluxctl query prints it; "" without one.
  function checkText(c) {
    if (!c) return "";
    const reason = c.reason || "failed";
    if (c.state === "failing") {
      return "check: " + reason + ", " + Math.max(1, c.failures_in_a_row) + " in a row, since " +
        new Date(c.since_unix_ms).toISOString().slice(11, 19) + " UTC";
    }
    if (c.failures_in_a_row > 0) {
      return "check: " + c.state + ", " + c.failures_in_a_row + " failed: " + reason;
    }
    return "check: " + c.state;
  }

  function instanceCounts(instances) {
    const total = instances.length;
    const live = instances.filter((i) => i.state === "live").length;
    return { total, live };
  }

  function healthOf(svc) {
    const { total, live } = instanceCounts(svc.instances || []);
    if (total === 0) return ["idle", "no instances"];
    if (live === total) return ["healthy", "healthy"];
    if (live === 0) return ["down", "down"];
    return ["degraded", "degraded (" + (total - live) + " not live)"];
  }

  function renderList() {
    const services = view.services;
    if (!services) {
      replace("app", h("p", { class: "muted", text: "Waiting for fluxd…" }));
      return;
    }
    if (services.length === 0) {
      replace("app", h("h1", { text: "Services" }),
        h("p", { class: "empty", text: "No services yet: add one with fluxctl service add." }));
      return;
    }
    const rows = services
      .slice()
      .sort((a, b) => a.name.localeCompare(b.name))
      .map((svc) => {
        const insts = svc.instances || [];
        const { total, live } = instanceCounts(insts);
        const [cls, text] = healthOf(svc);
        let active = 0, conns = 0, fails = 0;
        for (const i of insts) {
          if (!i.health) continue;
          active += i.health.active || 0;
          conns += i.health.connections || 0;
          fails += i.health.connect_failures || 0;
        }
        return h("tr", { "data-service": svc.name, "data-total": total, "data-live": live, "data-health": cls },
          h("td", {}, h("a", { href: serviceHref(svc.name), text: svc.name })),
          h("td", { class: "mono", text: addressText(svc.address) }),
          h("td", { text: (svc.protocol || "tcp") + (svc.forward === "kernel" ? " · kernel" : ""),
            title: svc.forward === "kernel" ? KERNEL_NOTE : undefined }),
          h("td", { class: "num instances", text: total + " / " + live + " live" }),
          h("td", {}, h("span", { class: "badge " + cls, text: text }), refusedMarker(svc)),
          h("td", { class: "num", text: String(active) }),
          h("td", { class: "num", text: String(conns) }),
          h("td", { class: "num", text: String(fails) }),
          h("td", { text: String((svc.rules || []).length) }));
      });
    replace("app",
      h("h1", { text: "Services" }),
      h("div", { class: "sub", text: services.length + " service" + (services.length === 1 ? "" : "s") + "; instance health as seen from this host" }),
      h("table", { id: "services" },
        h("thead", {}, h("tr", {},
          h("th", { text: "service" }), h("th", { text: "address" }), h("th", { text: "protocol" }),
          h("th", { class: "num", text: "instances (total / live)" }), h("th", { text: "health" }),
          h("th", { class: "num", text: "active" }), h("th", { class: "num", text: "connections" }),
          h("th", { class: "num", text: "connect failures" }), h("th", { text: "rules" }))),
        h("tbody", {}, rows)));
  }

  // The VIP guard's refusal of this service on this host, or nothing.
  function refusedMarker(svc, id) {
    if (!svc.refused) return null;
    return h("span", { class: "refused", id: id, "data-refused": svc.refused,
      text: "not routed on this host: VIP " + svc.refused });
  }

  function selectorText(sel) {
    if (!sel) return "all containers";
    const parts = [];
    if (sel.image) parts.push("image=" + sel.image);
    if (sel.tag) parts.push("tag=" + sel.tag);
    for (const [k, v] of Object.entries(sel.labels || {})) parts.push("label " + k + "=" + v);
    for (const [k, v] of Object.entries(sel.env || {})) parts.push("env " + k + "=" + v);
    return parts.length ? parts.join(", ") : "all containers";
  }

  function labelKeys(instances) {
    const keys = new Set();
    for (const i of instances) {
      for (const k of Object.keys((i.container && i.container.labels) || {})) keys.add(k);
    }
    return [...keys].sort();
  }

  function renderService() {
    const r = view.route;
    const info = view.info;
    if (!info) {
      const st = document.getElementById("stale");
      const msg = !st.hidden && /^HTTP 404/.test(st.dataset.error || "")
        ? "No service named " + r.service + "." : "Waiting for fluxd…";
      replace("app", h("h1", { text: r.service }), h("p", { class: "muted", text: msg }));
      return;
    }
    const insts = (info.instances || []).slice().sort((a, b) => a.name.localeCompare(b.name));
    const { total, live } = instanceCounts(insts);
    const [cls, text] = healthOf(info);

    // Header.
    const header = [
      h("h1", { id: "service-name", text: info.name }),
      h("div", { class: "sub" },
        h("span", { class: "mono", text: addressText(info.address) }),
        h("span", { text: info.protocol || "tcp" }),
        info.instance_port ? h("span", { text: "instance port " + info.instance_port }) : null,
        info.balance ? h("span", { text: String(info.balance) }) : null,
        info.health ? h("span", { id: "health-check", text: "health check " + (info.health.kind === "http" ? "http:" + info.health.path : info.health.kind) }) : null,
        info.forward === "kernel" ? h("span", { id: "forwarding", title: KERNEL_NOTE, text: "forwarded by the kernel" }) : null,
        info.locality || info.affinity
          ? h("span", { id: "traffic", text: ["locality " + (info.locality || "any"), "affinity " + (info.affinity || "none")].join(", ") }) : null,
        info.proxy_protocol ? h("span", { id: "proxy-protocol", text: "PROXY protocol " + info.proxy_protocol }) : null,
        info.timeouts ? h("span", { id: "timeouts", text: "timeouts " + Object.entries(info.timeouts).map(([k, v]) => k.replace(/_ms$/, "").replace("_", "-") + " " + v + " ms").join(", ") }) : null,
        h("span", { id: "instance-count", "data-total": total, "data-live": live, text: total + " instances, " + live + " live" }),
        h("span", {}, h("span", { class: "badge " + cls, text: text }))),
      info.refused ? h("p", {}, refusedMarker(info, "refused")) : null,
    ];
    // Weights only once some rule sets one: only then do rules share by weight.
    const weighted = (info.rules || []).some((rule) => rule.weight !== undefined);
    const weightOf = (rule) => (rule.weight === undefined ? 100 : rule.weight);
    const rules = (info.rules || []).length
      ? h("ul", { class: "rules", id: "rules" }, info.rules.map((rule) =>
          h("li", weighted ? { "data-weight": weightOf(rule) } : {}, h("b", { text: rule.name }), ": ", selectorText(rule.selector),
            rule.instance_port ? " → port " + rule.instance_port : "",
            weighted ? " · weight " + weightOf(rule) + (weightOf(rule) === 0 ? " (drained)" : "") : "")))
      : h("p", { class: "muted", id: "rules", text: "No rules: only static instances." });

    // Instances.
    const rows = insts.map((i) => {
      const c = i.container || {};
      const hl = i.health || {};
      return h("tr", { "data-instance": i.name, "data-state": i.state },
        h("td", { class: "mono", text: i.name }),
        h("td", { text: i.host || "–" }),
        h("td", { text: c.name || "–" }),
        h("td", { class: "mono", text: c.image || "–" }),
        h("td", { class: "tag", text: c.tag || "–" }),
        h("td", { class: "mono", text: i.address || "–" }),
        h("td", {}, h("span", { class: "badge " + String(i.state).replace(/\s+/g, "-"), text: i.state, title: checkText(hl.check) || c.address_note || undefined }),
          hl.check && hl.check.state === "failing"
            ? h("span", { class: "check muted", "data-check": hl.check.reason || "failed", text: " " + checkText(hl.check) }) : null,
          c.address_note ? h("span", { class: "note muted", "data-note": c.address_note, text: " " + c.address_note }) : null,
          i.drained ? h("span", { class: "drained muted", "data-drained": "true", text: " drained" }) : null),
        h("td", { text: fmtAgo(hl.last_success_unix_ms) }),
        h("td", { class: "num", text: hl.active === undefined ? "–" : String(hl.active) }),
        h("td", { class: "num", text: hl.connections === undefined ? "–" : String(hl.connections) }),
        h("td", { class: "num", text: hl.connect_failures === undefined ? "–" : String(hl.connect_failures) }));
    });
    const table = insts.length
      ? h("table", { id: "instances" },
          h("thead", {}, h("tr", {},
            ["instance", "host", "container", "image", "tag", "address", "state", "last success"].map((t) => h("th", { text: t })),
            ["active", "connections", "connect failures"].map((t) => h("th", { class: "num", text: t })))),
          h("tbody", {}, rows))
      : h("p", { class: "empty", id: "instances", text: "No instances." });

    // Group-by selector: fixed groups plus every container label key seen.
    const groups = GROUPS.concat(labelKeys(insts).map((k) => "label:" + k));
    if (!groups.includes(r.group)) groups.push(r.group);
    const series = view.series ? view.series.series || [] : [];
    const keys = series.map((x) => x.key);
    const color = (k) => PALETTE[Math.max(0, keys.indexOf(k)) % PALETTE.length];

    // The skeleton is built once per service and group; polls refill its parts, so that the
    // group selector is not rebuilt (and closed) under the user's pointer every 2 s.
    let root = document.getElementById("service-view");
    if (!root || root.dataset.service !== r.service || root.dataset.group !== r.group ||
        root.dataset.scope !== r.scope) {
      root = h("div", { id: "service-view", "data-service": r.service, "data-group": r.group, "data-scope": r.scope },
        h("div", { id: "service-header" }),
        h("h2", { text: "Rules" }), h("div", { id: "rules-box" }),
        h("h2", { text: "Instances" }), h("div", { id: "instances-box" }),
        h("div", { class: "controls" },
          h("h2", { id: "traffic-title", style: "margin:0", text: "Traffic" }),
          h("label", { for: "group", class: "muted", text: "group by" }),
          h("select", {
            id: "group",
            onchange: (e) => { location.hash = serviceHref(r.service, e.target.value, r.scope); },
          }),
          h("label", { for: "scope", class: "muted", text: "seen from" }),
          h("select", {
            id: "scope",
            onchange: (e) => { location.hash = serviceHref(r.service, r.group, e.target.value); },
          }, h("option", { value: "host", "data-scope": "host", text: "this host" }),
          h("option", { value: "cluster", "data-scope": "cluster", text: "every host" })),
          h("span", { id: "interval", class: "muted" })),
        h("div", { id: "hosts-status", class: "muted" }),
        h("div", { id: "legend-box" }),
        h("div", { id: "charts", "data-group": r.group }));
      replace("app", root);
    }
    replace("service-header", header);
    replace("rules-box", rules);
    replace("instances-box", table);

    const select = document.getElementById("group");
    const have = [...select.options].map((o) => o.value).join("\n");
    if (have !== groups.join("\n")) {
      select.replaceChildren(...groups.map((g) => h("option", { value: g, text: g })));
    }
    select.value = r.group;
    document.getElementById("scope").value = r.scope;

    document.getElementById("traffic-title").textContent = r.scope === "cluster"
      ? "Traffic from every host"
      : "Traffic on " + (view.series ? view.series.host : "this host");
    replace("hosts-status", hostsStatus(view.series));
    document.getElementById("interval").textContent =
      "every " + ((view.series && view.series.interval_ms) || POLL_MS) / 1000 + " s, last 15 min";
    const http = info.protocol === "http";
    replace("legend-box", legend(series, color, http));
    const charts = document.getElementById("charts");
    charts.dataset.seriesCount = String(series.length);
    charts.dataset.protocol = http ? "http" : "tcp";
    charts.replaceChildren(...(http ? HTTP_CHARTS.concat(CHARTS) : CHARTS).map((c) => chart(c, series, color)));
  }

  function last(arr) {
    if (!arr) return null;
    for (let i = arr.length - 1; i >= 0; i--) if (arr[i] !== null && arr[i] !== undefined) return arr[i];
    return null;
  }

  function legend(series, color, http) {
    if (!series.length) {
      return h("p", { id: "legend", class: "muted", "data-series-count": 0, text: "No traffic recorded on this host yet." });
    }
    return h("ul", { id: "legend", "data-series-count": series.length }, series.map((x) => {
      const n = x.connections_per_s || [];
      const conn = n.length ? n[n.length - 1] : 0;
      const bytes = last(x.bytes_per_s);
      const errs = last(x.errors_per_s);
      const p50 = last(x.connect_p50_ms);
      const p99 = last(x.connect_p99_ms);
      const reqs = x.requests_per_s || [];
      const req = reqs.length ? reqs[reqs.length - 1] : 0;
      const perClass = {};
      for (const c of CLASSES) {
        const v = x["http_" + c + "_per_s"] || [];
        perClass["data-last-" + c] = http ? (v.length ? v[v.length - 1] : 0) : null;
      }
      const reqP50 = last(x.request_p50_ms);
      const reqP99 = last(x.request_p99_ms);
      const httpText = http
        ? fmtRate(req) + " req/s · " + fmtRate(perClass["data-last-5xx"]) + " 5xx/s · req p50 " + fmtMs(reqP50) + " / p99 " + fmtMs(reqP99) + " · "
        : "";
      return h("li", Object.assign({
        class: "series",
        "data-series-key": x.key,
        "data-last-value": conn,
        "data-last-bytes": bytes === null ? "" : bytes,
        "data-last-errors": errs === null ? "" : errs,
        "data-last-p50": p50 === null ? "" : p50,
        "data-last-p99": p99 === null ? "" : p99,
        "data-last-active": last(x.active) === null ? "" : last(x.active),
        "data-points": n.length,
        "data-last-requests": http ? req : null,
        "data-last-req-p50": http ? (reqP50 === null ? "" : reqP50) : null,
        "data-last-req-p99": http ? (reqP99 === null ? "" : reqP99) : null,
      }, perClass),
        h("span", { class: "swatch", style: "background:" + color(x.key) }),
        h("span", { class: "key", text: x.key }),
        h("span", { class: "vals", text: httpText +
          fmtRate(conn) + " conn/s · " + fmtBytes(bytes) + "/s · " + fmtRate(errs) + " err/s · p50 " + fmtMs(p50) + " / p99 " + fmtMs(p99) }));
    }));
  }

  // ---------- charts (inline SVG) ----------

  const W = 560, H = 190, PAD_L = 52, PAD_R = 10, PAD_T = 8, PAD_B = 22;

  // A round step giving 2 to 4 gridlines above zero, and the top of the axis.
  function axis(v) {
    if (!(v > 0)) return { step: 0.25, top: 1 };
    const raw = v / 4;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    let step = 10 * p;
    for (const m of [1, 2, 2.5, 5]) if (m * p >= raw) { step = m * p; break; }
    return { step, top: Math.ceil(v / step - 1e-9) * step };
  }

  function chart(c, series, color) {
    // Lines: one per key, or two (p50, p99) per key for latency.
    const lines = [];
    for (const x of series) {
      if (c.metric === "latency") {
        lines.push({ key: x.key, t: x.t, v: x.connect_p50_ms || [], cls: "p50" });
        lines.push({ key: x.key, t: x.t, v: x.connect_p99_ms || [], cls: "p99" });
      } else if (c.metric === "request_latency") {
        lines.push({ key: x.key, t: x.t, v: x.request_p50_ms || [], cls: "p50" });
        lines.push({ key: x.key, t: x.t, v: x.request_p99_ms || [], cls: "p99" });
      } else if (c.metric === "status") {
        // One line per status class the group answered with in the window (2xx if none).
        const used = CLASSES.filter((cl) => (x["http_" + cl + "_per_s"] || []).some((n) => n > 0));
        for (const cl of used.length ? used : ["2xx"]) {
          lines.push({ key: x.key, t: x.t, v: x["http_" + cl + "_per_s"] || [], cls: "s" + cl, code: cl });
        }
      } else {
        lines.push({ key: x.key, t: x.t, v: x[c.metric] || [], cls: "" });
      }
    }
    let t0 = Infinity, t1 = -Infinity, vmax = 0;
    for (const l of lines) {
      for (let i = 0; i < l.t.length; i++) {
        t0 = Math.min(t0, l.t[i]);
        t1 = Math.max(t1, l.t[i]);
        if (l.v[i] !== null && l.v[i] !== undefined) vmax = Math.max(vmax, l.v[i]);
      }
    }
    const { step, top } = axis(vmax);
    const plotW = W - PAD_L - PAD_R, plotH = H - PAD_T - PAD_B;
    const span = t1 > t0 ? t1 - t0 : 1;
    const x = (t) => PAD_L + ((t - t0) / span) * plotW;
    const y = (v) => PAD_T + plotH - (v / top) * plotH;

    const svg = s("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": c.title });
    for (let i = 0; i * step <= top + 1e-9; i++) {
      const v = i * step;
      svg.appendChild(s("line", { class: "grid", x1: PAD_L, x2: W - PAD_R, y1: y(v), y2: y(v) }));
      svg.appendChild(s("text", { class: "axis", x: PAD_L - 6, y: y(v) + 3, "text-anchor": "end", text: c.fmt(v) }));
    }
    if (!isFinite(t0)) {
      svg.appendChild(s("text", { class: "nodata", x: PAD_L + plotW / 2, y: PAD_T + plotH / 2, "text-anchor": "middle", text: "no data yet" }));
    } else {
      // Time labels: both ends, and between them as many as fit.
      const n = t1 - t0 >= 8000 ? 4 : 1;
      for (let i = 0; i <= n; i++) {
        const t = t0 + ((t1 - t0) * i) / n;
        const anchor = i === 0 ? "start" : i === n ? "end" : "middle";
        svg.appendChild(s("text", { class: "axis", x: x(t), y: H - 6, "text-anchor": anchor, text: fmtTime(t) }));
      }
      for (const l of lines) {
        // Gaps (null latency: no connection in that interval) lift the pen.
        let d = "", pen = false, points = 0, px = 0, py = 0;
        for (let i = 0; i < l.t.length; i++) {
          const v = l.v[i];
          if (v === null || v === undefined) { pen = false; continue; }
          px = x(l.t[i]); py = y(v);
          d += (pen ? "L" : "M") + px.toFixed(1) + " " + py.toFixed(1);
          pen = true;
          points++;
        }
        if (!points) continue;
        // A single point still shows, as a dot.
        if (points === 1) {
          svg.appendChild(s("circle", { class: "dot", cx: px.toFixed(1), cy: py.toFixed(1), r: 2.5, fill: color(l.key), "data-series-key": l.key }));
        }
        svg.appendChild(s("path", {
          class: "line" + (l.cls ? " " + l.cls : ""),
          d: d,
          stroke: color(l.key),
          "data-series-key": l.key,
          "data-class": l.code,
          "data-last-value": last(l.v) === null ? "" : last(l.v),
        }));
      }
    }
    return h("div", { class: "chart", id: "chart-" + c.metric, "data-metric": c.metric, "data-max": vmax },
      h("h3", {}, c.title, " ", h("span", { class: "muted", text: c.unit })),
      svg);
  }

  // Relative times in the instance table age between polls, but they are redrawn on every
  // poll anyway; nothing else needs a clock.
  window.addEventListener("hashchange", start);
  getJSON("/v1/host").then((x) => { document.getElementById("host").textContent = "host " + x.name; }, () => {});
  start();
})();
