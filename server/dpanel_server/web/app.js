// dPanel Edge web panel. No framework: the page is a table, a few forms and a terminal,
// and a few hundred lines of DOM code are easier to audit than a framework's build chain.
// Every device-supplied string reaches the page through textContent (el() below);
// nothing here assigns innerHTML.
"use strict";

(function () {
  const PAGE = 100;            // rows per page: 3,000 devices are 30 pages, never 3,000 <tr>
  const FANOUT = 8;            // concurrent execs of a selection (each its own API stream)
  const MAX_PANE = 1 << 20;    // characters of output shown per device
  const state = { me: null, csrf: "", fleet: new Map(), order: [], seq: 0, page: 0,
                  filter: "", selected: new Set(), es: null, buffered: [], loaded: false,
                  rowOf: new Map(), term: null };
  const app = document.getElementById("app");

  // ---------------------------------------------------------------- DOM helpers
  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
      else if (k === "class") n.className = v;
      else n.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      n.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return n;
  }
  function clear(n) { while (n.firstChild) n.removeChild(n.firstChild); return n; }
  function show(...nodes) { clear(app).append(...nodes); }
  const can = (action) => {
    const role = state.me ? state.me.role : "viewer";
    if (action === "exec" || action === "tunnel") return role === "operator" || role === "admin";
    return action === "read" || role === "admin";
  };
  function ago(t) {
    if (!t) return "";
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return Math.floor(s) + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " d ago";
  }
  const when = (t) => t ? new Date(t * 1000).toISOString().replace(".000", "") : "";
  const stateText = { online: "online", offline: "offline", not_answering: "not answering",
                      revoked: "revoked" };

  // ---------------------------------------------------------------- API
  function csrf() {
    if (state.csrf) return state.csrf;
    const m = document.cookie.match(/(?:^|; )__Host-dpanel_csrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : "";
  }
  async function api(method, path, body, raw) {
    const headers = { "Accept": "application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = csrf();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, credentials: "same-origin",
                                  body: body === undefined ? undefined : JSON.stringify(body) });
    if (raw) return r;
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (r.status === 401 && path !== "/web/login") { loginView("Your session ended; log in again."); }
    if (!r.ok) {
      const err = new Error((data && data.error) || ("HTTP " + r.status));
      err.status = r.status;
      throw err;
    }
    return data;
  }

  // ---------------------------------------------------------------- login
  function loginView(message) {
    stopStream();
    state.me = null;
    document.getElementById("who").textContent = "";
    document.getElementById("logout").hidden = true;
    const error = el("p", { id: "login-error", class: "error", role: "alert" }, message || "");
    const token = el("input", { id: "token", type: "password", autocomplete: "off",
                                "aria-describedby": "login-error", required: true });
    const form = el("form", { class: "login", id: "login-form", onsubmit: async (ev) => {
      ev.preventDefault();
      error.textContent = "";
      try {
        const me = await api("POST", "/web/login", { token: token.value });
        token.value = "";
        await start(me);
      } catch (e) {
        error.textContent = e.status === 401 ? "Wrong or revoked token." : e.message;
      }
    } }, el("h1", {}, "Log in"),
      el("label", { for: "token" }, "Operator token (dpo1.…) or the admin token"), token,
      el("button", { type: "submit", id: "login-button" }, "Log in"), error);
    show(form);
    token.focus();
  }

  async function start(me) {
    state.me = me;
    state.csrf = me.csrf;
    document.getElementById("who").textContent = me.name + " (" + me.role + ")";
    document.getElementById("logout").hidden = false;
    startStream();
    await loadFleet();
    route();
  }

  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("POST", "/web/logout", {}); } catch (e) { /* gone already */ }
    state.csrf = "";
    state.fleet.clear();
    loginView("Logged out.");
  });

  // ---------------------------------------------------------------- live presence
  function startStream() {
    stopStream();
    const es = new EventSource("/web/events");
    state.es = es;
    const live = document.getElementById("live");
    es.addEventListener("hello", () => { live.className = "live on"; live.textContent = "live"; });
    es.addEventListener("reload", () => loadFleet().then(route));
    es.onerror = () => { live.className = "live off"; live.textContent = "reconnecting"; };
    es.onmessage = (ev) => {
      const batch = JSON.parse(ev.data);
      if (!state.loaded) { state.buffered.push(...batch); return; }
      applyEvents(batch);
    };
  }
  function stopStream() { if (state.es) { state.es.close(); state.es = null; } }

  function applyEvents(batch) {
    let changed = false;
    for (const e of batch) {
      if (e.seq <= state.seq) continue;
      state.seq = e.seq;
      const d = state.fleet.get(e.id);
      if (!d) continue;  // a device enrolled since the list was loaded: shown on reload
      if (d.state === "revoked") continue;
      Object.assign(d, { state: e.state, since: e.since, agent_version: e.agent_version,
                         port: e.port, host_key_ok: e.host_key_ok });
      const tr = state.rowOf.get(e.id);
      if (tr && tr.isConnected) fillRow(tr, d);
      changed = true;
    }
    if (changed) updateCounts();
    const dev = document.getElementById("device-state");
    if (dev) refreshDeviceState();
  }

  async function loadFleet() {
    state.loaded = false;
    const out = await api("GET", "/web/fleet");
    state.fleet = new Map(out.devices.map((d) => [d.id, d]));
    state.order = out.devices.map((d) => d.id).sort();
    state.seq = out.seq;
    state.loaded = true;
    const buffered = state.buffered;
    state.buffered = [];
    applyEvents(buffered);
  }

  // ---------------------------------------------------------------- fleet
  function matches(d, terms) {
    for (const t of terms) {
      const eq = t.indexOf("=");
      if (eq > 0) {
        if ((d.labels || {})[t.slice(0, eq)] !== t.slice(eq + 1)) return false;
        continue;
      }
      const hay = [d.id, d.agent_version, stateText[d.state] || d.state,
                   ...Object.entries(d.labels || {}).map(([k, v]) => k + "=" + v)]
        .join(" ").toLowerCase();
      if (!hay.includes(t.toLowerCase())) return false;
    }
    return true;
  }
  function visible() {
    const terms = state.filter.split(/\s+/).filter(Boolean);
    return state.order.filter((id) => state.fleet.has(id) && matches(state.fleet.get(id), terms));
  }
  function updateCounts() {
    const n = document.getElementById("counts");
    if (!n) return;
    const c = { online: 0, offline: 0, not_answering: 0, revoked: 0 };
    for (const d of state.fleet.values()) c[d.state] = (c[d.state] || 0) + 1;
    n.textContent = state.fleet.size + " devices: " + c.online + " online, " + c.offline +
      " offline, " + c.not_answering + " not answering" + (c.revoked ? ", " + c.revoked + " revoked" : "");
  }
  function lastAudit(a) {
    if (!a) return "";
    const res = a.exit !== null && a.exit !== undefined ? "exit " + a.exit : (a.result || "");
    return [when(a.started), a.user, a.kind, a.command, res].filter(Boolean).join(" · ");
  }
  function fillRow(tr, d) {
    const cells = tr.children;
    const st = cells[3];
    clear(st).append(el("span", { class: "state " + d.state }, stateText[d.state] || d.state));
    if (d.host_key_ok === false) st.append(el("span", { class: "chip" }, "host key mismatch"));
    cells[4].textContent = ago(d.since);
    cells[4].title = when(d.since);
    cells[5].textContent = d.agent_version || "";
    cells[6].textContent = d.port ? "open (port " + d.port + ")" : "closed";
    tr.dataset.state = d.state;
  }
  function row(id) {
    const d = state.fleet.get(id);
    const box = can("exec") ? el("input", { type: "checkbox", "aria-label": "select " + id,
      checked: state.selected.has(id), onchange: (ev) => {
        if (ev.target.checked) state.selected.add(id); else state.selected.delete(id);
        const b = document.getElementById("run-selected");
        if (b) b.textContent = "Run on selected (" + state.selected.size + ")";
      } }) : "";
    const labels = el("td", { class: "labels" },
      Object.entries(d.labels || {}).map(([k, v]) => el("span", { title: k + "=" + v }, k + "=" + v)));
    const audit = lastAudit(d.last_audit);
    const tr = el("tr", { "data-device": id },
      el("td", {}, box), el("td", {}, el("a", { href: "#/device/" + encodeURIComponent(id) }, id)),
      labels, el("td", {}), el("td", {}), el("td", {}), el("td", {}),
      el("td", { class: "trunc", title: audit }, audit));
    fillRow(tr, d);
    state.rowOf.set(id, tr);
    return tr;
  }
  function renderRows() {
    const body = document.getElementById("fleet-body");
    if (!body) return;
    const ids = visible();
    const pages = Math.max(1, Math.ceil(ids.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    state.rowOf.clear();
    clear(body).append(...ids.slice(state.page * PAGE, (state.page + 1) * PAGE).map(row));
    document.getElementById("page").textContent = "page " + (state.page + 1) + " of " + pages +
      " (" + ids.length + " shown)";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
    updateCounts();
  }
  function fleetView() {
    const filter = el("input", { type: "text", id: "filter", value: state.filter,
      placeholder: "filter: text, or key=value for a label", "aria-label": "filter devices",
      oninput: (ev) => { state.filter = ev.target.value; state.page = 0; renderRows(); } });
    const tools = el("div", { class: "toolbar" }, filter, el("span", { id: "counts" }));
    if (can("exec")) {
      tools.append(el("button", { type: "button", id: "run-selected", onclick: () => {
        if (!state.selected.size) return;
        execView([...state.selected].sort());
      } }, "Run on selected (" + state.selected.size + ")"));
    }
    if (can("enrol")) tools.append(el("button", { type: "button", id: "enrol-open",
      class: "secondary", onclick: enrolView }, "Enrol a device"));
    const table = el("table", { id: "fleet" }, el("thead", {}, el("tr", {},
      ["", "Device", "Labels", "Presence", "Since", "Agent", "Tunnel", "Last audit"]
        .map((h) => el("th", { scope: "col" }, h)))), el("tbody", { id: "fleet-body" }));
    const pager = el("div", { class: "pager" },
      el("button", { type: "button", id: "prev", class: "secondary",
                     onclick: () => { state.page--; renderRows(); } }, "Previous"),
      el("span", { id: "page" }),
      el("button", { type: "button", id: "next", class: "secondary",
                     onclick: () => { state.page++; renderRows(); } }, "Next"));
    show(el("h1", {}, "Fleet"), tools, table, pager);
    renderRows();
  }
  setInterval(() => {  // "since" columns age; only the visible page
    for (const [id, tr] of state.rowOf) if (tr.isConnected) fillRow(tr, state.fleet.get(id));
  }, 30000);

  // ---------------------------------------------------------------- enrol (admin)
  function enrolView() {
    const name = el("input", { type: "text", id: "enrol-name", required: true });
    const labels = el("input", { type: "text", id: "enrol-labels", placeholder: "site=acme,room=2" });
    const out = el("div", { id: "enrol-out", role: "status" });
    const form = el("form", { onsubmit: async (ev) => {
      ev.preventDefault();
      clear(out);
      const lab = {};
      for (const part of labels.value.split(",").map((s) => s.trim()).filter(Boolean)) {
        const i = part.indexOf("=");
        lab[i > 0 ? part.slice(0, i) : part] = i > 0 ? part.slice(i + 1) : "";
      }
      try {
        const r = await api("POST", "/v1/devices", { name: name.value.trim(), labels: lab });
        out.append(el("p", {}, "Enrolled " + r.device.id + ". The token is shown once: put it on the device."),
                   el("pre", { class: "token", id: "enrol-token" }, r.token));
        await loadFleet();
      } catch (e) { out.append(el("p", { class: "error", role: "alert" }, e.message)); }
    } }, el("label", { for: "enrol-name" }, "Device name "), name, " ",
      el("label", { for: "enrol-labels" }, "Labels "), labels, " ",
      el("button", { type: "submit", id: "enrol-submit" }, "Enrol"));
    show(el("h1", {}, "Enrol a device"), form, out, el("p", {}, el("a", { href: "#/" }, "Back to the fleet")));
    name.focus();
  }

  // ---------------------------------------------------------------- exec
  function b64bytes(s) {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  async function runOne(device, command, pre, status) {
    status.textContent = "running";
    const dec = { stdout: new TextDecoder(), stderr: new TextDecoder() };
    try {
      const r = await api("POST", "/v1/devices/" + encodeURIComponent(device) + "/exec",
                          { command }, true);
      if (!r.ok) {
        let msg = "HTTP " + r.status, code = "error";
        try { const j = await r.json(); msg = j.error; code = j.code; } catch (e) { /* */ }
        status.textContent = msg;
        return code === "offline" || code === "device_offline" ? "offline" : code;
      }
      const reader = r.body.getReader();
      const text = new TextDecoder();
      let buf = "", exit = null, shown = 0, cut = false;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += text.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl); buf = buf.slice(nl + 1);
          if (!line.trim()) continue;
          const ev = JSON.parse(line);
          if (ev.stdout !== undefined || ev.stderr !== undefined || ev.data !== undefined) {
            const kind = ev.stream || (ev.stderr !== undefined ? "stderr" : "stdout");
            const data = ev.data !== undefined ? ev.data : ev[kind];
            const text = dec[kind === "stderr" ? "stderr" : "stdout"].decode(b64bytes(data), { stream: true });
            // a huge output must not take the tab down: keep the first MiB per device,
            // read (and drop) the rest so that the exit status still arrives
            if (shown < MAX_PANE) pre.append(text.slice(0, MAX_PANE - shown));
            shown += text.length;
            if (shown >= MAX_PANE && !cut) {
              cut = true;
              pre.append("\n[output cut at 1 MiB here; dpanel exec --out-dir keeps all of it]\n");
            }
          } else if (ev.exit !== undefined) {
            exit = ev.exit;
          } else if (ev.error !== undefined) {
            status.textContent = ev.error;
            return ev.code || "error";
          }
        }
      }
      status.textContent = "exit " + exit;
      status.dataset.exit = String(exit);
      return exit === 0 ? "ok" : "exit " + exit;
    } catch (e) {
      status.textContent = e.message;
      return "error";
    }
  }
  function execView(devices, back) {
    const cmd = el("input", { type: "text", id: "exec-command", "aria-label": "command",
                              placeholder: "command, e.g. uname -a", size: 60 });
    const results = el("div", { id: "exec-results" });
    const summary = el("p", { id: "exec-summary", class: "summary", role: "status" });
    const go = el("button", { type: "submit", id: "exec-run" }, "Run");
    const form = el("form", { class: "toolbar", onsubmit: async (ev) => {
      ev.preventDefault();
      const command = cmd.value.trim();
      if (!command) return;
      go.disabled = true;
      clear(results); summary.textContent = "running on " + devices.length + " device(s)…";
      const jobs = devices.map((d) => {
        const pre = el("pre", { class: "out", "data-device": d });
        const status = el("span", { class: "status", "data-device": d });
        results.append(el("details", { class: "exec-result", open: true, "data-device": d },
                          el("summary", {}, d + ": ", status), pre));
        return () => runOne(d, command, pre, status);
      });
      const outcomes = [];
      let next = 0;
      await Promise.all(Array.from({ length: Math.min(FANOUT, jobs.length) }, async () => {
        while (next < jobs.length) { const i = next++; outcomes[i] = await jobs[i](); }
      }));
      const tally = {};
      for (const o of outcomes) tally[o] = (tally[o] || 0) + 1;
      summary.textContent = Object.entries(tally).sort((a, b) => b[1] - a[1])
        .map(([k, n]) => n + " " + k).join(", ");
      go.disabled = false;
    } }, cmd, go);
    const nodes = [el("h2", {}, "Run a command on " + devices.length + " device(s)"),
                   el("p", { class: "muted" }, devices.join(", ")), form, summary, results];
    if (back) return el("section", { id: "exec" }, ...nodes);
    show(...nodes, el("p", {}, el("a", { href: "#/" }, "Back to the fleet")));
    cmd.focus();
    return null;
  }

  // ---------------------------------------------------------------- device page
  let current = null;
  function refreshDeviceState() {
    const n = document.getElementById("device-state");
    if (!n || !current) return;
    const d = state.fleet.get(current);
    if (!d) return;
    clear(n).append(el("span", { class: "state " + d.state }, stateText[d.state] || d.state),
                    " since " + ago(d.since));
    const t = document.getElementById("tunnel-state");
    if (t) t.textContent = d.port ? "open on port " + d.port : "closed";
  }
  async function deviceView(name) {
    current = name;
    let info, audit;
    try {
      [info, audit] = await Promise.all([
        api("GET", "/web/devices/" + encodeURIComponent(name)),
        api("GET", "/v1/audit?limit=50&device=" + encodeURIComponent(name))]);
    } catch (e) { show(el("p", { class: "error", role: "alert" }, e.message)); return; }
    if (!state.fleet.has(name)) state.fleet.set(name, Object.assign({ id: name, labels: info.labels }, info.view));
    const facts = el("dl", { class: "facts" },
      el("dt", {}, "Presence"), el("dd", { id: "device-state" }),
      el("dt", {}, "Labels"), el("dd", {}, Object.entries(info.labels).map(([k, v]) => el("span", { class: "chip" }, k + "=" + v))),
      el("dt", {}, "Host key"), el("dd", { id: "hostkey" }, info.pinned_fingerprint || "none yet"),
      el("dt", {}, "Pin"), el("dd", { id: "pin-state" }, info.pin +
        (info.pin === "mismatch" && info.announced_fingerprint ? ": the device announces " + info.announced_fingerprint : "")),
      el("dt", {}, "Agent"), el("dd", {}, info.view.agent_version || ""),
      el("dt", {}, "Tunnel"), el("dd", {}, el("span", { id: "tunnel-state" }), " ",
        can("tunnel") ? el("button", { type: "button", id: "tunnel-open", class: "secondary", onclick: () => tunnel("POST") }, "Open") : "",
        " ",
        can("tunnel") ? el("button", { type: "button", id: "tunnel-close", class: "secondary", onclick: () => tunnel("DELETE") }, "Close") : ""),
      el("dd", { id: "tunnel-msg", role: "status" }));
    const nodes = [el("h1", { id: "device-name" }, name), facts];
    if (can("exec")) {
      const box = el("div", { id: "term-box" });
      nodes.push(el("h2", {}, "Terminal"),
        el("div", { class: "toolbar" },
          el("button", { type: "button", id: "term-open", onclick: () => openTerminal(name, box) }, "Open terminal"),
          el("span", { id: "term-size", class: "muted" })), box,
        execView([name], true));
    }
    if (can("enrol")) {
      nodes.push(el("h2", {}, "Admin"), el("button", { type: "button", id: "revoke", class: "danger",
        onclick: async () => {
          if (!window.confirm("Revoke " + name + "? It is cut off at once.")) return;
          try { await api("DELETE", "/v1/devices/" + encodeURIComponent(name)); await loadFleet(); deviceView(name); }
          catch (e) { document.getElementById("tunnel-msg").textContent = e.message; }
        } }, "Revoke"));
    }
    const rows = audit.slice().reverse().map((a) => el("tr", {},
      el("td", {}, when(a.started)), el("td", {}, a.user || ""), el("td", {}, a.kind || ""),
      el("td", { class: "trunc", title: a.command || "" }, a.command || ""),
      el("td", {}, a.exit !== null && a.exit !== undefined ? String(a.exit) : (a.result || a.signal || "")),
      el("td", {}, a.recording === "ok" ? el("button", { type: "button", class: "secondary replay",
        "data-id": a.id, onclick: () => replay(a.id, replayBox) }, "Replay") : "")));
    const replayBox = el("div", { id: "replay-box" });
    nodes.push(el("h2", {}, "Audit"), el("table", { id: "audit" }, el("thead", {}, el("tr", {},
      ["Started", "User", "Kind", "Command", "Exit", "Recording"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows)), replayBox, el("p", {}, el("a", { href: "#/" }, "Back to the fleet")));
    show(...nodes);
    refreshDeviceState();
  }
  async function tunnel(method) {
    const msg = document.getElementById("tunnel-msg");
    msg.textContent = method === "POST" ? "opening…" : "closing…";
    try {
      const r = await api(method, "/v1/devices/" + encodeURIComponent(current) + "/tunnel",
                          method === "POST" ? {} : undefined);
      msg.textContent = method === "POST" ? "open on port " + r.port : (r.closed ? "closed" : "was not open");
    } catch (e) { msg.textContent = e.message; }
  }

  // ---------------------------------------------------------------- terminal
  function newTerm(box) {
    clear(box);
    const div = el("div", { class: "term", id: "term" });
    box.append(div);
    const term = new window.Terminal({ cursorBlink: true, scrollback: 5000, fontSize: 14,
                                       lineHeight: 1.2, fontFamily: "monospace" });
    const fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(div);
    fit.fit();
    return { term, fit, div };
  }
  function openTerminal(name, box) {
    if (state.term) state.term.close();
    const { term, fit } = newTerm(box);
    const sizeLabel = document.getElementById("term-size");
    const showSize = () => { sizeLabel.textContent = term.cols + "x" + term.rows; sizeLabel.dataset.cols = term.cols; sizeLabel.dataset.rows = term.rows; };
    showSize();
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(proto + "//" + location.host + "/web/devices/" + encodeURIComponent(name) + "/terminal");
    ws.binaryType = "arraybuffer";
    const enc = new TextEncoder();
    ws.onopen = () => {
      ws.send(JSON.stringify({ csrf: csrf(), cols: term.cols, rows: term.rows }));
      term.focus();
      box.scrollIntoView();
      box.dataset.state = "open";
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        const m = JSON.parse(ev.data);
        if (m.exit !== undefined) term.write("\r\n[shell ended: exit " + m.exit + "]\r\n");
        if (m.error) term.write("\r\n[" + m.error + "]\r\n");
        return;
      }
      term.write(new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      box.dataset.state = "closed";
      if (ev.code !== 1000) term.write("\r\n[connection closed" + (ev.reason ? ": " + ev.reason : "") + "]\r\n");
    };
    term.onData((d) => { if (ws.readyState === 1) ws.send(enc.encode(d)); });
    term.onBinary((d) => {
      if (ws.readyState !== 1) return;
      const b = new Uint8Array(d.length);
      for (let i = 0; i < d.length; i++) b[i] = d.charCodeAt(i) & 255;
      ws.send(b);
    });
    term.onResize(({ cols, rows }) => { showSize(); if (ws.readyState === 1) ws.send(JSON.stringify({ cols, rows })); });
    const onWin = () => fit.fit();
    window.addEventListener("resize", onWin);
    state.term = { close: () => { window.removeEventListener("resize", onWin); ws.close(1000); term.dispose(); state.term = null; } };
  }
  async function replay(id, box) {
    const r = await api("GET", "/v1/audit/" + encodeURIComponent(id) + "/recording", undefined, true);
    if (!r.ok) { clear(box).append(el("p", { class: "error" }, "recording: HTTP " + r.status)); return; }
    const lines = (await r.text()).split("\n").filter(Boolean);
    const { term } = newTerm(box);
    box.scrollIntoView();  // xterm.js renders only while it is in the viewport
    box.dataset.replay = String(id);
    let last = 0;
    for (const line of lines.slice(1)) {
      let ev;
      try { ev = JSON.parse(line); } catch (e) { continue; }
      if (!Array.isArray(ev) || ev[1] !== "o") continue;
      const wait = Math.min(1, Math.max(0, ev[0] - last)) * 1000 / 2;  // 2x, gaps cut to 1 s
      last = ev[0];
      if (wait > 5) await new Promise((res) => setTimeout(res, wait));
      term.write(ev[2]);
    }
    term.write("", () => { box.dataset.done = "1"; });  // after the last write is parsed
  }

  // ---------------------------------------------------------------- routing
  function route() {
    if (!state.me) return;
    if (state.term && !location.hash.startsWith("#/device/")) state.term.close();
    const m = location.hash.match(/^#\/device\/(.+)$/);
    if (m) { deviceView(decodeURIComponent(m[1])); return; }
    current = null;
    fleetView();
  }
  window.addEventListener("hashchange", route);

  (async () => {
    try { await start(await api("GET", "/web/session")); }
    catch (e) { loginView(""); }
  })();
})();
