// The voxanode dashboard: reads this node's REST API and websockets and renders the
// nodes, a map of where app instances run, the apps, the event feed and app logs.
//
// Authentication: when the API replies 401 the page prompts for a bearer token and keeps
// it in sessionStorage only, so it is gone when the tab closes. REST calls send it as
// `Authorization: Bearer`; websockets, whose browser API cannot set headers, send it
// as the `access_token` query parameter, which the node accepts on upgrades only.
//
// Updates: network events trigger refreshes (node events the node list, app events
// the apps), and a slow periodic refresh covers missed events. While an app is
// converging or a node is suspect, the refresh runs more often.
//
// Rate limits: the node counts requests per category (see voxanode/api/ratelimit.py).
// A 429 pauses only what spends that category's budget, until its Retry-After: the
// node list for "data", the app list and statuses for "default", and the Deploy
// button for "deployments".
"use strict";

(function () {
  const TOKEN_STORAGE_KEY = "voxanode.dashboard.token";
  const SLOW_REFRESH_MS = 20000;
  const BUSY_REFRESH_MS = 2500;
  const EVENT_REFRESH_DELAY_MS = 300;
  const RECONNECT_MIN_MS = 1000;
  const RECONNECT_MAX_MS = 15000;
  const MAX_FEED_ENTRIES = 200;
  const MAX_LOG_LINES = 1000;
  const LOG_TAIL_LINES = 100;
  const APP_LIST_LIMIT = 100;
  // The maximum of get_app_status calls per refresh. Apps past it show only their list entry.
  const MAX_STATUS_CALLS = 20;
  const HIGH_LOAD_PERCENT = 85;
  const NARROW_MAP_PX = 520;
  // The wait after a 429 whose reply has no usable Retry-After header.
  const DEFAULT_RETRY_AFTER_SECONDS = 10;
  const RATE_LIMIT_PAUSES = {
    data: "the node list",
    default: "the app list",
  };
  // Node states in which the node's last reported load is no longer current.
  const GONE_NODE_STATES = new Set(["offline", "left"]);
  // Failure kinds of a 422 deploy that are about the image, so the error belongs to the Image field.
  const IMAGE_FAILURE_KINDS = new Set(["image_missing", "pull_refused", "registry_not_allowed"]);
  const NODE_EVENT_TYPES = new Set(["node_joined", "node_left", "node_suspected"]);
  const APP_EVENT_TYPES = new Set(["app_deployed", "app_failed", "load_rebalanced"]);
  const APP_COLOURS = [
    "#2f7fd1", "#d9480f", "#2b8a3e", "#9c36b5", "#e8590c",
    "#1098ad", "#c2255c", "#5c940d", "#6741d9", "#f08c00",
  ];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    token: sessionStorage.getItem(TOKEN_STORAGE_KEY),
    nodes: [],
    apps: [],
    // Set by the first successful read, so that the summary counts nothing unread.
    nodesLoaded: false,
    appsLoaded: false,
    statuses: new Map(),
    appColours: new Map(),
    waitingForToken: false,
    // Set when the user cancels the token dialog, so that 401 replies stop reopening it.
    tokenDeclined: false,
    // Set once an API reply was 401, so that the token button shows only where tokens matter.
    tokenNeeded: false,
    // Rate limit category -> { until: epoch ms, message } of a read category paused by a 429.
    readPauses: new Map(),
    deployBlockedUntil: 0,
    deployTimer: null,
    refreshTimer: null,
    pending: { nodes: false, apps: false },
    pendingTimer: null,
    events: null,
    eventsReconnectMs: RECONNECT_MIN_MS,
    lastEventId: null,
    logs: null,
    stopTarget: null,
  };

  const $ = (id) => document.getElementById(id);

  // --- small DOM helpers ---------------------------------------------------------

  function el(tag, attributes, ...children) {
    const element = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "className") element.className = value;
      else if (name === "text") element.textContent = value;
      else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
      else element.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      element.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return element;
  }

  function svg(tag, attributes, ...children) {
    const element = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined) continue;
      if (name === "text") element.textContent = value;
      else element.setAttribute(name, String(value));
    }
    for (const child of children) if (child) element.append(child);
    return element;
  }

  function cell(label, ...children) {
    return el("td", { "data-label": label }, ...children);
  }

  function formatAge(timestamp) {
    if (!timestamp) return "never";
    const seconds = Math.max(0, Math.round((Date.now() - Date.parse(timestamp)) / 1000));
    if (Number.isNaN(seconds)) return timestamp;
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    return `${Math.round(seconds / 3600)} h ago`;
  }

  function formatTime(timestamp) {
    const date = new Date(timestamp);
    return Number.isNaN(date.getTime()) ? String(timestamp) : date.toLocaleTimeString();
  }

  function plural(count, singular, pluralWord) {
    return `${count} ${count === 1 ? singular : pluralWord || singular + "s"}`;
  }

  // Split an API message at its `backtick` spans, which name commands, into text and
  // <code> elements.
  function richText(text) {
    return String(text ?? "").split("`").map((part, index) => (index % 2 === 1 ? el("code", { text: part }) : part));
  }

  function shortId(id) {
    return typeof id === "string" && id.length > 11 ? id.slice(0, 11) + "…" : String(id);
  }

  function percentBar(label, percent) {
    const value = Math.max(0, Math.min(100, Number(percent) || 0));
    const fill = el("div", { className: value >= HIGH_LOAD_PERCENT ? "bar-fill high" : "bar-fill" });
    // The page's style-src 'self' blocks style attributes but allows CSSOM changes like this one.
    fill.style.width = `${value}%`;
    const track = el("div", {
      className: "bar-track",
      role: "meter",
      "aria-label": label,
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": value.toFixed(1),
    }, fill);
    return el("div", { className: "bar" }, track, el("span", { className: "bar-value", text: `${value.toFixed(1)} %` }));
  }

  function statusBadge(status) {
    return el("span", { className: "status", "data-status": status, text: status });
  }

  function setMessage(element, text, kind) {
    element.replaceChildren(...richText(text || ""));
    if (kind) element.dataset.kind = kind;
    else delete element.dataset.kind;
  }

  function showNotice(text) {
    const notice = $("notice");
    notice.replaceChildren(...richText(text || ""));
    notice.hidden = !text;
  }

  // --- the API -------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, envelope, fallback) {
      const error = envelope && envelope.error;
      super(error && error.message ? error.message : fallback);
      this.status = status;
      this.code = error ? error.code : null;
      this.details = (error && error.details) || {};
    }
  }

  // Send one request to this node's API and return the parsed JSON body. Every status
  // from 400 up throws an ApiError with the envelope's message.
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    const options = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (error) {
      throw new ApiError(0, null, `${method} ${path} failed before a reply: ${error.message}`);
    }
    let parsed = null;
    try {
      parsed = await response.json();
    } catch (error) {
      parsed = null;
    }
    if (response.ok) return parsed;

    const failure = new ApiError(response.status, parsed, `${method} ${path} failed with HTTP ${response.status}`);
    if (response.status === 401) {
      state.tokenNeeded = true;
      updateTokenButton();
      if (!state.tokenDeclined) askForToken(failure.message);
    }
    if (response.status === 429) {
      const retrySeconds = Number(response.headers.get("Retry-After")) || DEFAULT_RETRY_AFTER_SECONDS;
      const category = failure.details.category || rateLimitCategory(method, path);
      noteRateLimit(category, retrySeconds, failure.message);
    }
    throw failure;
  }

  // --- rate limits ---------------------------------------------------------------

  // The category that the node counts a request in, as request_category in
  // voxanode/api/ratelimit.py decides it. Used only when a 429 names no category.
  function rateLimitCategory(method, path) {
    const route = path.split("?")[0];
    if (route.startsWith("/status/") || route === "/metrics") return "status";
    if (route.startsWith("/data/")) return "data";
    if (method === "POST" && route.replace(/\/$/, "") === "/apps/add_app") return "deployments";
    return "default";
  }

  function noteRateLimit(category, retrySeconds, message) {
    const until = Date.now() + retrySeconds * 1000;
    if (category === "deployments") {
      blockDeploys(until, message);
    } else if (RATE_LIMIT_PAUSES[category]) {
      const previous = state.readPauses.get(category);
      if (previous) clearTimeout(previous.timer);
      // The paused part is read again as soon as its pause ends.
      const parts = category === "data" ? { nodes: true } : { apps: true };
      const timer = setTimeout(() => requestRefresh(parts), until - Date.now());
      state.readPauses.set(category, { until, message, timer });
      showRateLimitNotice();
    }
  }

  function isPaused(category) {
    const pause = state.readPauses.get(category);
    if (!pause) return false;
    if (Date.now() < pause.until) return true;
    state.readPauses.delete(category);
    return false;
  }

  function secondsUntil(epochMs) {
    return Math.max(1, Math.ceil((epochMs - Date.now()) / 1000));
  }

  // Show the read categories still paused, or clear the notice when none is.
  function showRateLimitNotice() {
    const lines = [];
    for (const category of Object.keys(RATE_LIMIT_PAUSES)) {
      if (!isPaused(category)) continue;
      const pause = state.readPauses.get(category);
      lines.push(
        `The node's rate limit was reached: ${pause.message}. Refreshing ${RATE_LIMIT_PAUSES[category]} again in ${secondsUntil(pause.until)} s.`,
      );
    }
    showNotice(lines.join(" "));
  }

  function blockDeploys(until, message) {
    state.deployBlockedUntil = until;
    $("deploy-submit").disabled = true;
    setMessage(
      $("deploy-message"),
      `Deploying is paused by the node's rate limit: ${message}. Deploy works again at ${new Date(until).toLocaleTimeString()}.`,
      "error",
    );
    clearTimeout(state.deployTimer);
    state.deployTimer = setTimeout(() => {
      state.deployBlockedUntil = 0;
      $("deploy-submit").disabled = false;
      setMessage($("deploy-message"), "Deploying is possible again.", null);
    }, until - Date.now());
  }

  // --- token handling ------------------------------------------------------------

  function askForToken(reason) {
    if (state.waitingForToken) return;
    state.waitingForToken = true;
    $("token-reason").replaceChildren(...richText(state.token
      ? `The node rejected the token: ${reason}`
      : `This node needs a token: ${reason}`));
    $("token-error").hidden = true;
    $("token-input").value = "";
    const dialog = $("token-dialog");
    if (!dialog.open) dialog.showModal();
    $("token-input").focus();
  }

  function saveToken(token) {
    state.token = token;
    if (token) sessionStorage.setItem(TOKEN_STORAGE_KEY, token);
    else sessionStorage.removeItem(TOKEN_STORAGE_KEY);
    updateTokenButton();
  }

  // The button is hidden on a node that never asked for a token, such as one run with --dev.
  function updateTokenButton() {
    const button = $("token-button");
    button.textContent = state.token ? "Forget token" : "Enter token";
    button.hidden = !state.token && !state.tokenNeeded;
  }

  function setupTokenDialog() {
    $("token-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) {
        $("token-error").replaceChildren(...richText("Enter the token that `voxanode token create` printed."));
        $("token-error").hidden = false;
        return;
      }
      saveToken(token);
      state.waitingForToken = false;
      $("token-dialog").close();
      reconnectEvents();
      await refreshAll();
    });
    const decline = () => {
      state.waitingForToken = false;
      state.tokenDeclined = true;
      showNotice("No token: the dashboard cannot read this node. Use “Enter token” to try again.");
    };
    $("token-cancel").addEventListener("click", () => {
      $("token-dialog").close();
      decline();
    });
    // Escape closes a modal dialog with a cancel event.
    $("token-dialog").addEventListener("cancel", decline);
    $("token-button").addEventListener("click", () => {
      if (state.token) {
        saveToken(null);
        stopLogs("Token forgotten.");
        closeEvents();
        showNotice("The token was removed from this tab.");
        refreshAll();
        return;
      }
      state.waitingForToken = false;
      state.tokenDeclined = false;
      askForToken("enter a token to read and change this node.");
    });
    updateTokenButton();
  }

  // --- refreshing ----------------------------------------------------------------

  async function refreshNodes() {
    const body = await api("GET", "/data/discover_nodes/");
    state.nodes = body.nodes || [];
    state.nodesLoaded = true;
    renderNodes();
    renderMap();
  }

  async function refreshApps() {
    const body = await api("GET", `/apps/list_apps/?limit=${APP_LIST_LIMIT}`);
    state.apps = body.applications || [];
    state.appsLoaded = true;
    const active = state.apps.filter((app) => app.status !== "stopped").slice(0, MAX_STATUS_CALLS);
    const replies = await Promise.allSettled(
      active.map((app) => api("GET", `/apps/get_app_status/?app_id=${encodeURIComponent(app.app_id)}`)),
    );
    // An app whose status call failed keeps its last status, so that its instances and
    // metrics do not blink out for one refresh.
    const statuses = new Map();
    replies.forEach((reply, index) => {
      const appId = active[index].app_id;
      if (reply.status === "fulfilled") statuses.set(appId, reply.value);
      else if (state.statuses.has(appId)) statuses.set(appId, state.statuses.get(appId));
    });
    state.statuses = statuses;
    renderApps();
    renderMap();
    renderLogChoices();
  }

  // Refresh the requested parts, skipping a part whose rate limit category is paused.
  async function refresh(parts) {
    const jobs = [];
    if (parts.nodes && !isPaused("data")) jobs.push(refreshNodes());
    if (parts.apps && !isPaused("default")) jobs.push(refreshApps());
    const results = await Promise.allSettled(jobs);
    const failed = results.filter((result) => result.status === "rejected").map((result) => result.reason);
    renderSummary();
    if (failed.length === 0) {
      showRateLimitNotice();
    } else if (failed.some((error) => error.status === 429)) {
      showRateLimitNotice();
    } else if (!failed.some((error) => error.status === 401)) {
      showNotice(`Refresh failed: ${failed[0].message}`);
    }
    scheduleNextRefresh();
  }

  function refreshAll() {
    return refresh({ nodes: true, apps: true });
  }

  // Refresh soon after events, combining the events of a burst into one refresh.
  function requestRefresh(parts) {
    state.pending.nodes = state.pending.nodes || Boolean(parts.nodes);
    state.pending.apps = state.pending.apps || Boolean(parts.apps);
    if (state.pendingTimer) return;
    state.pendingTimer = setTimeout(() => {
      const pending = state.pending;
      state.pending = { nodes: false, apps: false };
      state.pendingTimer = null;
      refresh(pending);
    }, EVENT_REFRESH_DELAY_MS);
  }

  function isBusy() {
    if (state.nodes.some((node) => node.status === "suspect")) return true;
    return state.apps.some((app) => {
      if (app.status === "stopped" || app.status === "failed") return false;
      const replicas = app.replicas || {};
      return app.status === "deploying" || replicas.running !== replicas.desired || replicas.healthy !== replicas.desired;
    });
  }

  function scheduleNextRefresh() {
    clearTimeout(state.refreshTimer);
    const delay = isBusy() ? BUSY_REFRESH_MS : SLOW_REFRESH_MS;
    state.refreshTimer = setTimeout(refreshAll, delay);
  }

  // --- rendering -----------------------------------------------------------------

  function renderSummary() {
    const self = state.nodes.find((node) => node.is_self);
    const online = state.nodes.filter((node) => node.status === "online").length;
    const where = self ? `Node ${self.node_id} at ${self.address}` : "This node";
    const parts = [where];
    if (state.nodesLoaded) parts.push(`${online} of ${plural(state.nodes.length, "node")} online`);
    if (state.appsLoaded) parts.push(plural(state.apps.length, "app"));
    $("node-summary").textContent = parts.join(" · ");
  }

  function renderNodes() {
    const rows = state.nodes.map((node) => {
      const load = node.load || {};
      const self = node.is_self ? el("span", { className: "muted", text: " (this node)" }) : null;
      // A node that is gone keeps the load it last reported, which is no longer true.
      const gone = GONE_NODE_STATES.has(node.status);
      const unknownLoad = () => el("span", { className: "muted", title: `not known while ${node.status}`, text: "—" });
      return el(
        "tr",
        { "data-node-id": node.node_id, "data-status": node.status, className: gone ? "gone" : null },
        cell("Node", el("span", {}, el("span", { className: "mono node-id", title: node.node_id, text: shortId(node.node_id) }), self)),
        cell("Status", statusBadge(node.status)),
        cell("Address", el("span", { className: "mono", text: node.address })),
        cell("CPU", gone ? unknownLoad() : percentBar(`CPU of ${node.node_id}`, load.cpu_percent)),
        cell("Memory", gone ? unknownLoad() : percentBar(`Memory of ${node.node_id}`, load.memory_percent)),
        cell("Active apps", gone ? unknownLoad() : String(load.active_apps ?? 0)),
        cell("Last seen", el("time", { datetime: node.last_seen, title: node.last_seen, text: formatAge(node.last_seen) })),
      );
    });
    $("nodes-body").replaceChildren(...rows);
    $("nodes-empty").hidden = rows.length > 0;
    const online = state.nodes.filter((node) => node.status === "online").length;
    $("nodes-count").textContent = `(${online} online of ${state.nodes.length})`;
  }

  function appColour(appId) {
    if (!state.appColours.has(appId)) {
      state.appColours.set(appId, APP_COLOURS[state.appColours.size % APP_COLOURS.length]);
    }
    return state.appColours.get(appId);
  }

  function instancesOf(app) {
    const status = state.statuses.get(app.app_id);
    return status ? status.instances || [] : [];
  }

  function renderApps() {
    const body = $("apps-body");
    const existing = new Map([...body.children].map((row) => [row.dataset.appId, row]));
    const rows = state.apps.map((app) => {
      const row = existing.get(app.app_id) || buildAppRow(app);
      updateAppRow(row, app);
      return row;
    });
    // Keep rows that exist, so that a focused button or a typed replica count stays.
    rows.forEach((row, index) => {
      if (body.children[index] !== row) body.insertBefore(row, body.children[index] || null);
    });
    const focusWasInBody = body.contains(document.activeElement);
    while (body.children.length > rows.length) body.lastElementChild.remove();
    // The focus was in a removed row.
    if (focusWasInBody && !body.contains(document.activeElement)) $("apps-title").focus();
    $("apps-empty").hidden = rows.length > 0;
    const running = state.apps.filter((app) => app.status === "running").length;
    $("apps-count").textContent = `(${running} running of ${state.apps.length})`;
  }

  function buildAppRow(app) {
    const scaleInput = el("input", {
      type: "number",
      min: 0,
      inputmode: "numeric",
      className: "scale-input",
      "aria-label": `Replicas for ${app.name}`,
      oninput: (event) => { event.target.dataset.edited = "true"; },
    });
    const button = (className, text, label) => el("button", { type: "button", className, text, "aria-label": label });
    const scaleButton = button("scale-button", "Scale", `Scale app ${app.name}`);
    scaleButton.addEventListener("click", () => scaleApp(app.app_id, app.name, scaleInput));
    const stopButton = button("stop-button danger", "Stop", `Stop app ${app.name}`);
    stopButton.addEventListener("click", () => confirmStop(app.app_id, app.name));
    const logsButton = button("logs-button", "Logs", `Logs of app ${app.name}`);
    logsButton.addEventListener("click", () => followLogs(app.app_id));
    // tabindex -1: the row takes the focus when a focused button in it becomes disabled.
    return el(
      "tr",
      { "data-app-id": app.app_id, tabindex: -1, "aria-label": `App ${app.name}` },
      cell("App", el("span", {}, el("strong", { className: "app-name" }), el("span", { className: "app-id mono" }))),
      cell("Status", el("span", { className: "app-status" })),
      cell("Replicas", el("span", { className: "app-replicas" })),
      cell("Instances on", el("span", { className: "app-nodes mono" })),
      cell("Requests", el("span", { className: "metrics" })),
      cell("Actions", el("div", { className: "app-actions" }, scaleInput, scaleButton, stopButton, logsButton)),
    );
  }

  function updateAppRow(row, app) {
    const status = state.statuses.get(app.app_id);
    const replicas = (status && status.replicas) || app.replicas || {};
    row.dataset.status = app.status;
    row.querySelector(".app-name").textContent = app.name;
    row.querySelector(".app-id").textContent = app.app_id;
    row.querySelector(".app-status").replaceChildren(...statusCell(app, status));
    const counts = row.querySelector(".app-replicas");
    counts.textContent = `${replicas.desired ?? 0} / ${replicas.running ?? 0} / ${replicas.healthy ?? 0}`;
    counts.dataset.desired = replicas.desired ?? 0;
    counts.dataset.running = replicas.running ?? 0;
    counts.dataset.healthy = replicas.healthy ?? 0;

    const nodeIds = status ? instancesOf(app).map((instance) => instance.node_id) : app.nodes || [];
    // Each id stays on one line, and the list wraps between ids.
    const idSpans = nodeIds.flatMap((id, index) => [index ? ", " : null, el("span", { className: "node-id", text: shortId(id) })]);
    row.querySelector(".app-nodes").replaceChildren(...(nodeIds.length ? idSpans.filter(Boolean) : ["—"]));
    row.querySelector(".app-nodes").title = nodeIds.join(", ");

    const metrics = status && status.metrics;
    const metricsCell = row.querySelector(".metrics");
    if (metrics && metrics.total_requests > 0) {
      const p95 = metrics.p95_response_time_ms !== undefined ? `, p95 ${metrics.p95_response_time_ms.toFixed(1)} ms` : "";
      metricsCell.textContent = `${metrics.total_requests} req, avg ${metrics.avg_response_time_ms.toFixed(1)} ms${p95}, ${metrics.error_rate_percent.toFixed(1)} % errors`;
    } else {
      metricsCell.textContent = metrics ? "no requests yet" : "—";
    }

    const active = app.status !== "stopped" && app.status !== "failed";
    const scaleInput = row.querySelector(".scale-input");
    scaleInput.dataset.desired = replicas.desired ?? 0;
    if (document.activeElement !== scaleInput && scaleInput.dataset.edited !== "true") {
      scaleInput.value = replicas.desired ?? 0;
    }
    // A failed app can be stopped too, which marks it stopped instead of failed.
    const stoppable = app.status !== "stopped";
    const focused = document.activeElement;
    scaleInput.disabled = !active;
    row.querySelector(".scale-button").disabled = !active;
    row.querySelector(".stop-button").disabled = !stoppable;
    row.querySelector(".logs-button").disabled = !stoppable;
    // A disabled element loses the focus to <body>, so the row takes it instead.
    if (row.contains(focused) && focused.disabled) row.focus();
  }

  // The phase badge, and the health when the app runs and its status was read.
  function statusCell(app, status) {
    const badge = statusBadge(app.status);
    if (app.status === "stopped" || app.status === "failed") return [badge];
    const health = status && status.health && status.health !== "unknown" ? status.health : "health unknown";
    return [badge, el("span", { className: "muted app-health", text: ` · ${health}` })];
  }

  // The map: nodes on an ellipse, every pair of live nodes joined, and each app
  // instance a coloured dot beside the node that runs it.
  function renderMap() {
    const map = $("network-map");
    // A narrow map gets a smaller drawing, so that its labels stay readable when scaled.
    const narrow = map.clientWidth > 0 && map.clientWidth < NARROW_MAP_PX;
    const width = narrow ? 400 : 640;
    const height = narrow ? 340 : 380;
    map.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const centreX = width / 2;
    const centreY = height / 2 - 10;
    // A single node sits in the centre.
    let radiusX = 0;
    let radiusY = 0;
    if (state.nodes.length > 1) {
      radiusX = narrow ? 125 : 220;
      radiusY = narrow ? 105 : 120;
    }
    const positions = new Map();
    state.nodes.forEach((node, index) => {
      const angle = (2 * Math.PI * index) / Math.max(1, state.nodes.length) - Math.PI / 2;
      positions.set(node.node_id, { x: centreX + radiusX * Math.cos(angle), y: centreY + radiusY * Math.sin(angle) });
    });

    const instancesByNode = new Map();
    for (const app of state.apps) {
      for (const instance of instancesOf(app)) {
        if (!instancesByNode.has(instance.node_id)) instancesByNode.set(instance.node_id, []);
        instancesByNode.get(instance.node_id).push({ app, instance });
      }
    }

    const children = [];
    const description = describeMap(instancesByNode);
    children.push(svg("desc", { id: "map-description", text: description }));
    if (state.nodes.length === 0) {
      children.push(svg("text", { x: centreX, y: centreY, class: "empty-text", text: "No nodes yet" }));
    }
    const live = state.nodes.filter((node) => node.status === "online" || node.status === "suspect");
    for (let i = 0; i < live.length; i += 1) {
      for (let j = i + 1; j < live.length; j += 1) {
        const a = positions.get(live[i].node_id);
        const b = positions.get(live[j].node_id);
        children.push(svg("line", { class: "edge", x1: a.x, y1: a.y, x2: b.x, y2: b.y }));
      }
    }
    for (const node of state.nodes) {
      children.push(mapNode(node, positions.get(node.node_id), instancesByNode.get(node.node_id) || []));
    }
    map.replaceChildren(...children);
    renderLegend();
  }

  function mapNode(node, position, placed) {
    const group = svg("g", { class: "map-node", "data-node-id": node.node_id, "data-status": node.status });
    group.append(svg("title", { text: `${node.node_id} (${node.status}) at ${node.address}, ${plural(placed.length, "instance")}` }));
    if (node.is_self) group.append(svg("circle", { class: "self-ring", cx: position.x, cy: position.y, r: 34 }));
    group.append(svg("circle", { class: "node-circle", "data-status": node.status, cx: position.x, cy: position.y, r: 26 }));
    group.append(svg("text", { class: "node-label", x: position.x, y: position.y + 46, text: shortId(node.node_id) }));
    group.append(svg("text", { class: "node-sublabel", x: position.x, y: position.y + 61, text: `${node.status} · ${node.address}` }));
    placed.forEach(({ app, instance }, index) => {
      // Dots go round the node, 10 a ring, each ring further out.
      const ring = Math.floor(index / 10);
      const angle = (2 * Math.PI * (index % 10)) / 10 - Math.PI / 2;
      const distance = 40 + ring * 15;
      const dot = svg("circle", {
        class: "instance",
        "data-app-id": app.app_id,
        "data-instance-id": instance.instance_id,
        "data-health": instance.health,
        cx: position.x + distance * Math.cos(angle),
        cy: position.y + distance * Math.sin(angle) * 0.8,
        r: 7,
        fill: appColour(app.app_id),
      });
      dot.append(svg("title", { text: `${app.name}: ${instance.instance_id} ${instance.status}, ${instance.health || "health unknown"}` }));
      group.append(dot);
    });
    return group;
  }

  function describeMap(instancesByNode) {
    if (state.nodes.length === 0) return "No nodes yet.";
    const parts = state.nodes.map((node) => {
      const placed = instancesByNode.get(node.node_id) || [];
      const names = placed.map(({ app }) => app.name);
      return `${node.node_id} ${node.status}${names.length ? ` running ${names.join(", ")}` : ""}`;
    });
    return `${plural(state.nodes.length, "node")}: ${parts.join("; ")}.`;
  }

  function renderLegend() {
    const items = state.apps
      .filter((app) => instancesOf(app).length > 0)
      .map((app) => {
        const swatch = el("span", { className: "swatch", "aria-hidden": "true" });
        swatch.style.background = appColour(app.app_id);
        return el("li", { "data-app-id": app.app_id }, swatch, `${app.name} (${instancesOf(app).length})`);
      });
    $("map-legend").replaceChildren(...items);
  }

  // --- actions -------------------------------------------------------------------

  const DEPLOY_FIELDS = {
    name: "deploy-name",
    image: "deploy-image",
    replicas: "deploy-replicas",
    "resources.cpu": "deploy-cpu",
    "resources.memory": "deploy-memory",
    environment: "deploy-env",
    ports: "deploy-ports",
  };

  // Return the id of the form input that an API field path such as
  // "ports[0].container_port" or "environment.1BAD" belongs to.
  function inputForField(field) {
    if (!field) return null;
    if (field === "image") return DEPLOY_FIELDS.image;
    if (DEPLOY_FIELDS[field]) return DEPLOY_FIELDS[field];
    if (field.startsWith("resources")) return field.includes("cpu") ? DEPLOY_FIELDS["resources.cpu"] : DEPLOY_FIELDS["resources.memory"];
    if (field.startsWith("environment")) return DEPLOY_FIELDS.environment;
    if (field.startsWith("ports")) return DEPLOY_FIELDS.ports;
    return null;
  }

  function clearFieldErrors() {
    for (const id of Object.values(DEPLOY_FIELDS)) {
      $(id).removeAttribute("aria-invalid");
      $(`${id}-error`).hidden = true;
      $(`${id}-error`).textContent = "";
    }
  }

  function showFieldError(inputId, text) {
    $(inputId).setAttribute("aria-invalid", "true");
    $(`${inputId}-error`).textContent = text;
    $(`${inputId}-error`).hidden = false;
  }

  class FormInputError extends Error {
    constructor(inputId, message) {
      super(message);
      this.inputId = inputId;
    }
  }

  // A whole number goes to the API as a JSON number. Anything else goes as typed, so
  // that the API's own validation message names the problem.
  function numberOrText(text) {
    return /^-?\d+$/.test(text) ? Number(text) : text;
  }

  function parseEnvironment(text) {
    const environment = {};
    text.split("\n").forEach((line, index) => {
      if (!line.trim()) return;
      const equals = line.indexOf("=");
      if (equals < 1) {
        throw new FormInputError(DEPLOY_FIELDS.environment, `Line ${index + 1} is not KEY=VALUE: ${line.trim()}`);
      }
      environment[line.slice(0, equals).trim()] = line.slice(equals + 1);
    });
    return environment;
  }

  function parsePorts(text) {
    return text.split(/[\s,]+/).filter(Boolean).map((entry) => {
      const [port, protocol] = entry.split("/");
      const spec = { container_port: numberOrText(port) };
      if (protocol !== undefined) spec.protocol = protocol;
      return spec;
    });
  }

  function deployBody() {
    const value = (id) => $(id).value.trim();
    const body = { name: value("deploy-name"), image: value("deploy-image") };
    if (value("deploy-replicas")) body.replicas = numberOrText(value("deploy-replicas"));
    const resources = {};
    if (value("deploy-cpu")) resources.cpu = value("deploy-cpu");
    if (value("deploy-memory")) resources.memory = value("deploy-memory");
    if (Object.keys(resources).length) body.resources = resources;
    const environment = parseEnvironment($("deploy-env").value);
    if (Object.keys(environment).length) body.environment = environment;
    const ports = parsePorts(value("deploy-ports"));
    if (ports.length) body.ports = ports;
    return body;
  }

  async function deploy(event) {
    event.preventDefault();
    const message = $("deploy-message");
    clearFieldErrors();
    let body;
    try {
      body = deployBody();
    } catch (error) {
      if (!(error instanceof FormInputError)) throw error;
      showFieldError(error.inputId, error.message);
      setMessage(message, `Not deployed: check the ${fieldLabel(error.inputId)} field.`, "error");
      $(error.inputId).focus();
      return;
    }
    const submit = $("deploy-submit");
    submit.disabled = true;
    setMessage(message, `Deploying ${body.name}…`, null);
    try {
      const reply = await api("POST", "/apps/add_app/", body);
      setMessage(message, `${reply.message || "Deployed"}: ${body.name} is ${reply.app_id}.`, "ok");
      requestRefresh({ apps: true, nodes: true });
    } catch (error) {
      showDeployError(error);
    } finally {
      submit.disabled = Date.now() < state.deployBlockedUntil;
    }
  }

  // Show the API's message once: under the input it names, with a short summary under
  // Deploy, or under Deploy alone when it names no input.
  function showDeployError(error) {
    const message = $("deploy-message");
    // blockDeploys already explained a 429.
    if (error.status === 429) return;
    const details = error.details || {};
    let inputId = inputForField(details.field);
    if (!inputId && IMAGE_FAILURE_KINDS.has(details.kind)) inputId = DEPLOY_FIELDS.image;
    if (!inputId) {
      setMessage(message, error.message, "error");
      return;
    }
    showFieldError(inputId, error.message);
    const listed = details.app_id ? ` The failed app ${details.app_id} stays listed until it is stopped.` : "";
    setMessage(message, `Not deployed: check the ${fieldLabel(inputId)} field.${listed}`, "error");
    // A deploy that fails (422) still lists the app as failed.
    if (details.app_id) requestRefresh({ apps: true });
    $(inputId).focus();
  }

  function fieldLabel(inputId) {
    const label = document.querySelector(`label[for="${inputId}"]`);
    return label ? label.textContent.trim() : inputId;
  }

  async function scaleApp(appId, name, input) {
    const message = $("apps-message");
    const replicas = numberOrText(input.value.trim());
    setMessage(message, `Scaling ${name} to ${replicas}…`, null);
    try {
      const reply = await api("POST", "/apps/add_scale_app/", { app_id: appId, replicas });
      delete input.dataset.edited;
      const change = reply.new_replicas !== undefined ? ` (${reply.previous_replicas ?? "?"} → ${reply.new_replicas})` : "";
      setMessage(message, `${name}: ${reply.message || "scaled"}${change}.`, "ok");
      requestRefresh({ apps: true, nodes: true });
    } catch (error) {
      // The input goes back to the count the app has, so it does not show a refused one.
      delete input.dataset.edited;
      input.value = input.dataset.desired ?? "";
      setMessage(message, `Scaling ${name} failed: ${error.message}`, "error");
    }
  }

  function confirmStop(appId, name) {
    state.stopTarget = { appId, name };
    $("stop-text").textContent = `Stop ${name} (${appId})? Every instance is stopped and its containers are removed.`;
    $("stop-force").checked = false;
    $("stop-dialog").showModal();
    $("stop-cancel").focus();
  }

  // Put the focus back on the app's Stop button, or its row, or the Apps heading when
  // the row is gone, because a closed dialog may leave it on <body>.
  function focusAfterStopDialog(appId) {
    const row = [...$("apps-body").children].find((entry) => entry.dataset.appId === appId);
    if (!row) {
      $("apps-title").focus();
      return;
    }
    const stopButton = row.querySelector(".stop-button");
    if (stopButton.disabled) row.focus();
    else stopButton.focus();
  }

  function closeStopDialog() {
    const target = state.stopTarget;
    state.stopTarget = null;
    if ($("stop-dialog").open) $("stop-dialog").close();
    if (target) focusAfterStopDialog(target.appId);
    return target;
  }

  async function stopConfirmed(event) {
    event.preventDefault();
    const target = closeStopDialog();
    if (!target) return;
    const message = $("apps-message");
    setMessage(message, `Stopping ${target.name}…`, null);
    try {
      const reply = await api("POST", "/apps/add_stop_app/", { app_id: target.appId, force: $("stop-force").checked });
      const count = reply.instances_stopped !== undefined ? ` (${plural(reply.instances_stopped, "instance")})` : "";
      setMessage(message, `${target.name}: ${reply.message || "stopped"}${count}.`, "ok");
      requestRefresh({ apps: true, nodes: true });
    } catch (error) {
      setMessage(message, `Stopping ${target.name} failed: ${error.message}`, "error");
    }
  }

  // --- websockets ----------------------------------------------------------------

  function websocketUrl(path, parameters) {
    const url = new URL(path, window.location.href);
    url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
    for (const [name, value] of Object.entries(parameters)) {
      if (value !== null && value !== undefined) url.searchParams.set(name, value);
    }
    if (state.token) url.searchParams.set("access_token", state.token);
    return url.toString();
  }

  function setFeedState(kind, text) {
    const pill = $("feed-state");
    pill.dataset.state = kind;
    pill.textContent = `Events: ${text}`;
  }

  function connectEvents() {
    if (state.waitingForToken) {
      setFeedState("closed", "waiting for a token");
      return;
    }
    const socket = new WebSocket(websocketUrl("/ws/network/events", { since: state.lastEventId }));
    state.events = socket;
    let opened = false;
    socket.addEventListener("open", () => {
      opened = true;
      state.eventsReconnectMs = RECONNECT_MIN_MS;
      setFeedState("open", "live");
      // Events may have been missed while the socket was down.
      requestRefresh({ nodes: true, apps: true });
    });
    socket.addEventListener("message", (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch (error) {
        return;
      }
      handleEvent(event);
    });
    socket.addEventListener("close", () => {
      if (state.events !== socket) return;
      state.events = null;
      // An upgrade refused for `since` (an event no longer buffered) looks the same
      // as any other refusal here, so the next attempt starts without it.
      if (!opened) state.lastEventId = null;
      const delay = state.eventsReconnectMs;
      state.eventsReconnectMs = Math.min(RECONNECT_MAX_MS, state.eventsReconnectMs * 2);
      setFeedState("closed", `reconnecting in ${Math.round(delay / 1000)} s`);
      setTimeout(() => {
        if (state.events === null) connectEvents();
      }, delay);
    });
  }

  function closeEvents() {
    const socket = state.events;
    state.events = null;
    if (socket) socket.close();
  }

  function reconnectEvents() {
    closeEvents();
    state.eventsReconnectMs = RECONNECT_MIN_MS;
    connectEvents();
  }

  function handleEvent(event) {
    state.lastEventId = event.event_id || state.lastEventId;
    addFeedEntry(event);
    if (NODE_EVENT_TYPES.has(event.type)) {
      // Instances move off a node that left or failed.
      requestRefresh({ nodes: true, apps: event.type === "node_left" });
    } else if (APP_EVENT_TYPES.has(event.type)) {
      requestRefresh({ nodes: true, apps: true });
    }
  }

  function describeEvent(event) {
    const subject = event.node_id || event.app_id || "";
    const data = event.data || {};
    const extra = Object.entries(data)
      .filter(([, value]) => value !== null && value !== undefined && typeof value !== "object")
      .slice(0, 4)
      .map(([name, value]) => `${name}=${value}`)
      .join(" ");
    return [subject, extra].filter(Boolean).join(" ");
  }

  function addFeedEntry(event) {
    const list = $("events-list");
    const item = el(
      "li",
      { "data-event-type": event.type, "data-event-id": event.event_id },
      el("time", { datetime: event.timestamp, text: formatTime(event.timestamp) }),
      el("span", { className: "event-type", text: event.type }),
      el("span", { className: "mono", text: describeEvent(event) }),
    );
    list.prepend(item);
    while (list.children.length > MAX_FEED_ENTRIES) list.lastElementChild.remove();
    $("events-empty").hidden = true;
  }

  function renderLogChoices() {
    const select = $("logs-app");
    const chosen = select.value;
    const options = state.apps
      .filter((app) => app.status !== "stopped")
      .map((app) => el("option", { value: app.app_id, text: `${app.name} (${app.app_id})` }));
    select.replaceChildren(...options);
    if (options.some((option) => option.value === chosen)) select.value = chosen;
    $("logs-follow").disabled = options.length === 0;
  }

  function followLogs(appId) {
    stopLogs(null);
    const select = $("logs-app");
    if (appId) select.value = appId;
    const chosen = select.value;
    if (!chosen) return;
    const app = state.apps.find((entry) => entry.app_id === chosen);
    const name = app ? app.name : chosen;
    const output = $("logs-output");
    output.textContent = "";
    $("logs-state").textContent = `Connecting to the logs of ${name}…`;

    const socket = new WebSocket(websocketUrl(`/ws/apps/${encodeURIComponent(chosen)}/logs`, { tail: LOG_TAIL_LINES }));
    state.logs = socket;
    $("logs-stop").disabled = false;

    socket.addEventListener("open", () => {
      $("logs-state").textContent = `Following the logs of ${name}.`;
    });
    socket.addEventListener("message", (message) => {
      let line;
      try {
        line = JSON.parse(message.data);
      } catch (error) {
        return;
      }
      appendLogLine(line);
    });
    socket.addEventListener("close", (event) => {
      if (state.logs !== socket) return;
      state.logs = null;
      $("logs-stop").disabled = true;
      const reason = event.reason ? `: ${event.reason}` : "";
      $("logs-state").textContent = `The logs of ${name} closed (code ${event.code}${reason}).`;
    });
    if (appId) document.getElementById("logs-section").scrollIntoView({ block: "nearest" });
  }

  function appendLogLine(line) {
    const output = $("logs-output");
    const atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
    const time = line.timestamp ? formatTime(line.timestamp) : "";
    output.append(`${time} ${shortId(line.instance_id)} ${line.level}: ${line.message}\n`);
    while (output.childNodes.length > MAX_LOG_LINES) output.firstChild.remove();
    if (atBottom) output.scrollTop = output.scrollHeight;
  }

  function stopLogs(text) {
    const socket = state.logs;
    state.logs = null;
    if (socket) socket.close(1000, "closed by the dashboard");
    $("logs-stop").disabled = true;
    if (text) $("logs-state").textContent = text;
  }

  // --- start ---------------------------------------------------------------------

  function start() {
    setupTokenDialog();
    $("deploy-form").addEventListener("submit", deploy);
    $("stop-form").addEventListener("submit", stopConfirmed);
    $("stop-cancel").addEventListener("click", closeStopDialog);
    // Escape closes a modal dialog with a cancel event, before its close.
    $("stop-dialog").addEventListener("cancel", (event) => {
      event.preventDefault();
      closeStopDialog();
    });
    $("logs-form").addEventListener("submit", (event) => {
      event.preventDefault();
      followLogs(null);
    });
    $("logs-stop").addEventListener("click", () => stopLogs("Stopped following."));
    // A click tries at once, even where a 429 paused reads. Another 429 pauses them again.
    $("refresh-button").addEventListener("click", () => {
      for (const pause of state.readPauses.values()) clearTimeout(pause.timer);
      state.readPauses.clear();
      refreshAll();
    });
    // A tab in the background may have missed metrics and events.
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") requestRefresh({ nodes: true, apps: true });
    });
    window.addEventListener("resize", renderMap);
    // Keep "last seen" ages and the rate limit countdown current between refreshes.
    setInterval(() => {
      for (const time of document.querySelectorAll("#nodes-body time")) {
        time.textContent = formatAge(time.getAttribute("datetime"));
      }
      if (state.readPauses.size > 0) showRateLimitNotice();
    }, 5000);
    refreshAll().then(connectEvents);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
