// The reference dashboard: every "Client Action" of the event contract (docs/contract.md), driven by
// eventbus.js. State comes from the demo backend's API (on load and whenever eventbus.js asks for a
// resync); events update it live. Every event handler is idempotent, because an event may arrive
// after a reload that already contains its effect (docs/protocol.md, "Resync").
import { connect } from "/eventbus.js";

const $ = (selector, root = document) => root.querySelector(selector);

const model = {
  config: null,
  blockers: new Map(), // id -> blocker (PENDING only)
  agents: new Map(), // id -> {id, name, status, task_id, task_title}
  tasks: new Map(), // id -> {id, title, agent_id, status}
  activity: [], // newest first: {key, kind, text, at}
  sandbox: [], // newest first: events of the sandbox project, as they arrived
  dismissedSync: new Set(),
  modalBlockerId: null,
  loads: 0, // state reloads issued (for the latest-wins rule below)
  appliedLoad: 0,
  me: null, // this browser's person: {id, name} (localStorage)
  members: null, // presence of the project: [{id, name, viewing, answering, since}] or null
  seenSent: new Set(), // blockers this tab reported as seen
  seenAsked: new Set(), // blockers whose "first seen" this tab fetched after presence showed someone on them
  warnedFor: null, // the blocker whose "someone else is answering" warning was shown
};

// Exposed for the browser tests and for poking around in the console.
window.dashboard = { model, bus: null, resyncs: 0, events: [], sandboxEvents: [], ready: false };

// --- API -------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Accept: "application/json", ...(options.body ? { "Content-Type": "application/json" } : {}) },
  });
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* empty or not JSON */
  }
  if (!response.ok) {
    const error = new Error((body && body.message) || `HTTP ${response.status}`);
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return body;
}

async function fetchToken() {
  const { token } = await api("/api/gateway-token", {
    method: "POST",
    body: JSON.stringify({ user: model.me.id, name: model.me.name }),
  });
  return token;
}

// --- who am I (the demo has no login) ----------------------------------------------------------
// Each browser is one person: a random id and a first name, kept in localStorage, so that two
// tabs of one browser are one member of the project's presence and another browser is another.

const NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"];
const ME_KEY = "eventbus-demo-person";

function loadMe() {
  try {
    const stored = JSON.parse(localStorage.getItem(ME_KEY) || "null");
    if (stored && /^[A-Za-z0-9_-]{1,64}$/.test(stored.id) && typeof stored.name === "string" && stored.name.trim()) {
      return { id: stored.id, name: stored.name.trim().slice(0, 40) };
    }
  } catch {
    /* unreadable: start a new person */
  }
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  const id = "p-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  const me = { id, name: NAMES[bytes[0] % NAMES.length] };
  localStorage.setItem(ME_KEY, JSON.stringify(me));
  return me;
}

function rename(name) {
  const trimmed = name.trim().slice(0, 40);
  if (!trimmed || trimmed === model.me.name) return;
  localStorage.setItem(ME_KEY, JSON.stringify({ id: model.me.id, name: trimmed }));
  location.reload(); // a new token carries the new name
}

/** Reload everything from the backend: the full blocker list, agents, tasks, activity. */
async function loadState() {
  const load = ++model.loads;
  const state = await api(`/api/projects/${model.config.project_id}/state`);
  // Two reloads can overlap (page start and the first resync); the latest one issued wins.
  if (load < model.appliedLoad) return;
  model.appliedLoad = load;
  model.blockers = new Map(state.blockers.map((b) => [b.id, b]));
  model.agents = new Map(state.agents.map((a) => [a.id, a]));
  model.tasks = new Map(state.tasks.map((t) => [t.id, t]));
  model.activity = state.activity.slice();
  if (model.modalBlockerId !== null && !model.blockers.has(model.modalBlockerId)) closeModal();
  renderAll();
  return state.cursor || null;
}

async function onResync(projectId) {
  if (projectId === model.config.sandbox_project_id) return sandboxResync();
  window.dashboard.resyncs += 1;
  const cursor = await loadState();
  document.body.dataset.resyncs = String(window.dashboard.resyncs);
  // The position the state includes (publisher.outbox's snapshot): the bus continues exactly
  // after it, so an event published while the state was read is applied once, not twice.
  return cursor;
}

// --- presence: who else is here, and what they are doing --------------------------------------

function onPresence(members) {
  model.members = members;
  renderPresence();
  renderBlockers();
  renderModalPresence();
  // Someone else opened a blocker this page has no "first seen" for: the backend recorded it
  // (no contract event says so), so ask once rather than show "not seen by anyone yet".
  for (const m of members) {
    const id = m.id !== model.me.id ? m.viewing ?? m.answering : null;
    const b = id !== null ? model.blockers.get(id) : undefined;
    if (b && !b.first_seen_at && !model.seenAsked.has(id)) adoptSeen(id);
  }
}

/** Fetch a blocker's "first seen" (and its activity line) from the backend, once per blocker. */
async function adoptSeen(blockerId, blocker = null) {
  model.seenAsked.add(blockerId);
  try {
    const fresh = blocker || (await api(`/api/blockers/${blockerId}`));
    if (!fresh.first_seen_at) {
      model.seenAsked.delete(blockerId); // not recorded yet (their report is on its way): ask again later
      return;
    }
    if (model.blockers.has(blockerId)) model.blockers.set(blockerId, { ...model.blockers.get(blockerId), ...fresh });
    const activity = await api(`/api/projects/${model.config.project_id}/activity`);
    const seen = activity.find((entry) => entry.key === `blocker_seen:${blockerId}`);
    if (seen) addActivity(seen.key, seen.kind, seen.text, seen.at);
    renderAll();
  } catch (error) {
    model.seenAsked.delete(blockerId);
    console.warn("could not read the blocker", error);
  }
}

/** Other people's activity on a blocker: [{name, answering}] (answering first). */
function othersOn(blockerId) {
  if (!model.members) return [];
  return model.members
    .filter((m) => m.id !== model.me.id && (m.viewing === blockerId || m.answering === blockerId))
    .map((m) => ({ name: m.name || m.id, answering: m.answering === blockerId }))
    .sort((a, b) => Number(b.answering) - Number(a.answering) || a.name.localeCompare(b.name));
}

function presenceText(blockerId) {
  return othersOn(blockerId)
    .map((o) => (o.answering ? `${o.name} is answering…` : `${o.name} is viewing`))
    .join(" · ");
}

function initials(name) {
  const parts = name.trim().split(/\s+/).filter(Boolean);
  const letters = parts.length > 1 ? parts[0][0] + parts[parts.length - 1][0] : name.slice(0, 2);
  return letters.toUpperCase();
}

function hue(id) {
  let h = 0;
  for (const c of id) h = (h * 31 + c.charCodeAt(0)) % 360;
  return h;
}

function renderPresence() {
  const box = $("#presence");
  if (!model.members) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const members = model.members.slice().sort((a, b) => Number(b.id === model.me.id) - Number(a.id === model.me.id));
  $("#presence-list").replaceChildren(
    ...members.map((m) => {
      const name = m.name || m.id;
      const me = m.id === model.me.id;
      const doing = m.answering ? ` (answering #${m.answering})` : m.viewing ? ` (viewing #${m.viewing})` : "";
      return el(
        "li",
        {
          class: `avatar${me ? " me" : ""}${m.answering ? " answering" : ""}`,
          "data-testid": "presence-member",
          dataset: { memberId: m.id, name },
          title: `${name}${me ? " (you)" : ""}${doing}`,
          style: `--hue: ${hue(m.id)}`,
        },
        el("span", { "aria-hidden": "true" }, initials(name)),
        el("span", { class: "visually-hidden" }, `${name}${me ? " (you)" : ""}${doing}`),
      );
    }),
  );
  $("#presence-count").textContent = `${model.members.length} online`;
}

function renderModalPresence() {
  const line = $('[data-testid="modal-presence"]');
  if (model.modalBlockerId === null) return;
  const text = presenceText(model.modalBlockerId);
  line.textContent = text;
  line.hidden = !text;
  const warning = $('[data-testid="answer-warning"]');
  if (!warning.hidden && !othersOn(model.modalBlockerId).some((o) => o.answering)) {
    warning.hidden = true; // they stopped: no reason to ask twice
    model.warnedFor = null;
    $('[data-testid="answer-submit"]').textContent = "Send answer";
  }
}

function reportActivity() {
  const bus = window.dashboard.bus;
  if (!bus) return;
  const id = model.modalBlockerId;
  const typing = id !== null && $("#answer-input").value.trim() !== "";
  bus.activity(model.config.project_id, { viewing: id, answering: typing ? id : null });
}

async function markSeen(blockerId) {
  if (model.seenSent.has(blockerId)) return;
  model.seenSent.add(blockerId);
  try {
    const blocker = await api(`/api/blockers/${blockerId}/seen`, { method: "POST", body: JSON.stringify({ by: model.me.name }) });
    await adoptSeen(blockerId, blocker);
  } catch (error) {
    model.seenSent.delete(blockerId);
    console.warn("could not record the view", error);
  }
}

function seenText(b) {
  if (!b.first_seen_at) return "not seen by anyone yet";
  const waited = Math.max(0, Math.round((Date.parse(b.first_seen_at) - Date.parse(b.created_at)) / 1000));
  const after = waited < 60 ? `${waited} s` : `${Math.round(waited / 60)} min`;
  return `seen by ${b.first_seen_by || "someone"} after ${after}`;
}

// --- the sandbox project -----------------------------------------------------------------------
// A second project that no backend owns: the page shows its events as they arrive, so that what
// a newcomer publishes (the README's snippet, eventbus-publish) shows up without contradicting
// the demo backend's own project. Purely event-driven: there is no state to reload, so a resync
// only says that earlier events are not shown.

const SANDBOX_SHOWN = 20;

function sandboxResync() {
  if (model.sandbox.length) {
    model.sandbox.unshift({ key: `resync:${Date.now()}`, resync: true });
    renderSandbox();
  }
}

function sandboxSummary(event) {
  switch (event.type) {
    case "blocker_created": {
      const b = event.blocker;
      return `${b.agent_name} raised ${b.blocker_type} blocker #${b.id}: ${b.question}`;
    }
    case "blocker_resolved":
      return `Blocker #${event.blocker_id} resolved: ${event.answer}`;
    case "agent_resumed":
      return `${event.agent_id} resumed task #${event.task_id} after blocker #${event.blocker_id}`;
    case "blocker_expired":
      return `Blocker #${event.blocker_id} expired - task #${event.task_id} failed`;
    default:
      return "(an event type this page does not know)";
  }
}

function onSandboxEvent(event) {
  window.dashboard.sandboxEvents.push({ type: event.type, seq: event.seq });
  model.sandbox.unshift({ key: `seq:${event.seq}`, seq: event.seq, type: event.type, text: sandboxSummary(event) });
  model.sandbox.length = Math.min(model.sandbox.length, SANDBOX_SHOWN);
  renderSandbox();
}

function renderSandbox() {
  const panel = $("#sandbox-panel");
  if (!model.config.sandbox_project_id) {
    panel.hidden = true;
    return;
  }
  panel.hidden = false;
  $("#sandbox-project").textContent = `project ${model.config.sandbox_project_id}`;
  $("#sandbox-empty").hidden = model.sandbox.length > 0;
  $("#sandbox-feed").replaceChildren(
    ...model.sandbox.map((entry) =>
      entry.resync
        ? el("li", { class: "sandbox-item resync muted small" }, "Resynchronised: events before this line are not shown.")
        : el(
            "li",
            { class: "sandbox-item", "data-testid": "sandbox-item", dataset: { seq: entry.seq, type: entry.type } },
            el("span", { class: "sandbox-seq muted small" }, `#${entry.seq}`),
            el("code", { class: "sandbox-type small" }, entry.type),
            el("span", { class: "sandbox-text" }, entry.text),
          ),
    ),
  );
}

// --- events (the contract's Client Actions) --------------------------------------------------

const REVIEWER_PREFIX = "[simulated reviewer] ";

const handlers = {
  blocker_created(event) {
    const blocker = event.blocker;
    if (blocker.status === "PENDING" && !model.blockers.has(blocker.id)) {
      model.blockers.set(blocker.id, { ...blocker, project_id: event.project_id });
    }
    upsertAgent(blocker.agent_id, { name: blocker.agent_name, status: "blocked", task_id: blocker.task_id, task_title: blocker.task_title });
    upsertTask(blocker.task_id, { title: blocker.task_title, agent_id: blocker.agent_id, status: "BLOCKED" });
    addActivity(`blocker_created:${blocker.id}`, "blocker_created", `${blocker.agent_name} raised ${blocker.blocker_type} blocker #${blocker.id}`, blocker.created_at);
    if (blocker.blocker_type === "SYNC") flashTitle();
  },
  blocker_resolved(event) {
    model.blockers.delete(event.blocker_id);
    if (model.modalBlockerId === event.blocker_id) closeModal();
    toast(`Blocker #${event.blocker_id} resolved`, "success");
    // The demo's simulated reviewer signs its answers; say so, as the backend's activity does.
    const by = event.answer.startsWith(REVIEWER_PREFIX) ? " by the simulated reviewer" : "";
    addActivity(`blocker_resolved:${event.blocker_id}`, "blocker_resolved", `Blocker #${event.blocker_id} resolved${by}`, event.resolved_at);
  },
  agent_resumed(event) {
    const agent = model.agents.get(event.agent_id);
    upsertAgent(event.agent_id, { status: "working", task_id: event.task_id });
    upsertTask(event.task_id, { status: "IN_PROGRESS" });
    const who = agent ? `${agent.name}: ` : "";
    addActivity(`agent_resumed:${event.blocker_id}`, "agent_resumed", `${who}Agent resumed after blocker resolution`, event.resumed_at);
  },
  blocker_expired(event) {
    model.blockers.delete(event.blocker_id);
    if (model.modalBlockerId === event.blocker_id) closeModal();
    upsertTask(event.task_id, { status: "FAILED" });
    for (const agent of model.agents.values()) {
      // The task failed: the agent is idle with no task (as the backend records it), not idle
      // with the failed task's title still on its card.
      if (agent.task_id === event.task_id && agent.status === "blocked") upsertAgent(agent.id, { status: "idle", task_id: null, task_title: null });
    }
    toast(`Blocker #${event.blocker_id} expired - task failed`, "warning");
    addActivity(`blocker_expired:${event.blocker_id}`, "blocker_expired", `Blocker #${event.blocker_id} expired - task failed`, event.expired_at);
  },
};

function onEvent(event) {
  window.dashboard.events.push({ type: event.type, seq: event.seq });
  const handler = handlers[event.type];
  if (handler) handler(event); // unknown (newer) event types are ignored, not fatal
  renderAll();
}

function upsertAgent(id, fields) {
  const agent = model.agents.get(id) || { id, name: id, status: "idle", task_id: null, task_title: null };
  model.agents.set(id, { ...agent, ...fields });
}

function upsertTask(id, fields) {
  const task = model.tasks.get(id) || { id, title: `Task #${id}`, agent_id: null, status: "IN_PROGRESS" };
  model.tasks.set(id, { ...task, ...fields });
}

function addActivity(key, kind, text, at) {
  if (model.activity.some((entry) => entry.key === key)) return; // already there (after a reload)
  model.activity.unshift({ key, kind, text, at });
  model.activity.length = Math.min(model.activity.length, 50);
}

// --- rendering -------------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

function relativeTime(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 45) return "just now";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function expiresIn(iso) {
  const ttl = model.config ? model.config.blocker_ttl_seconds : 86400;
  const left = Date.parse(iso) / 1000 + ttl - Date.now() / 1000;
  if (left <= 0) return "expiring";
  if (left < 90) return `expires in ${Math.ceil(left)} s`;
  if (left < 5400) return `expires in ${Math.round(left / 60)} min`;
  return `expires in ${Math.round(left / 3600)} h`;
}

/** SYNC first (an agent is stopped until answered), then newest first. */
export function sortBlockers(blockers) {
  return blockers.slice().sort((a, b) => {
    if (a.blocker_type !== b.blocker_type) return a.blocker_type === "SYNC" ? -1 : 1;
    return Date.parse(b.created_at) - Date.parse(a.created_at) || b.id - a.id;
  });
}

let shownBlockers = new Set();

function presenceLine(blockerId) {
  const text = presenceText(blockerId);
  if (!text) return null;
  const answering = othersOn(blockerId).some((o) => o.answering);
  return el("p", { class: `presence-line small${answering ? " answering" : ""}`, "data-testid": "blocker-presence" }, text);
}

function renderBlockers() {
  const list = $("#blocker-list");
  const blockers = sortBlockers(Array.from(model.blockers.values()));
  // Only blockers that were not on screen before slide in; re-renders must not flicker.
  const fresh = (id) => (shownBlockers.has(id) ? "" : " fresh");
  list.replaceChildren(
    ...blockers.map((b) =>
      el(
        "li",
        { class: `blocker ${b.blocker_type.toLowerCase()}${fresh(b.id)}`, "data-testid": "blocker-item", dataset: { blockerId: b.id, blockerType: b.blocker_type } },
        el("div", { class: "blocker-main" },
          el("div", { class: "blocker-top" },
            el("span", { class: `type-tag ${b.blocker_type.toLowerCase()}` }, b.blocker_type),
            el("span", { class: "blocker-id" }, `#${b.id}`),
            el("span", { class: "muted" }, `${b.agent_name} · ${b.task_title}`),
          ),
          el("p", { class: "question", "data-testid": "blocker-question" }, b.question),
          el("p", { class: "muted small" },
            `${relativeTime(b.created_at)} · ${expiresIn(b.created_at)} · `,
            el("span", { "data-testid": "blocker-seen" }, seenText(b)),
          ),
          presenceLine(b.id),
        ),
        el("button", { type: "button", class: `button ${b.blocker_type === "SYNC" ? "primary" : ""}`, "data-testid": "answer-button", onclick: () => openModal(b.id) }, "Answer"),
      ),
    ),
  );
  shownBlockers = new Set(blockers.map((b) => b.id));
  $("#blocker-empty").hidden = blockers.length > 0;
  const badge = $("#blocker-count");
  badge.textContent = String(blockers.length);
  badge.dataset.count = String(blockers.length);
  badge.classList.toggle("has-sync", blockers.some((b) => b.blocker_type === "SYNC"));
  document.title = blockers.length ? `(${blockers.length}) Agent dashboard` : "Agent dashboard";
}

function renderSyncAlert() {
  const alert = $("#sync-alert");
  const pending = sortBlockers(Array.from(model.blockers.values())).filter(
    (b) => b.blocker_type === "SYNC" && !model.dismissedSync.has(b.id),
  );
  if (pending.length === 0) {
    alert.hidden = true;
    delete alert.dataset.blockerId;
    return;
  }
  const newest = pending[0];
  alert.hidden = false;
  alert.dataset.blockerId = String(newest.id);
  const more = pending.length > 1 ? ` (+${pending.length - 1} more)` : "";
  $('[data-testid="sync-alert-title"]', alert).textContent = `${newest.agent_name} is blocked on SYNC blocker #${newest.id}${more}`;
  $('[data-testid="sync-alert-question"]', alert).textContent = newest.question;
}

function renderAgents() {
  const agents = Array.from(model.agents.values()).sort((a, b) => a.id.localeCompare(b.id));
  $("#agent-list").replaceChildren(
    ...agents.map((a) =>
      el(
        "div",
        { class: `agent-card ${a.status}`, "data-testid": "agent-card", dataset: { agentId: a.id, status: a.status } },
        el("div", { class: "agent-head" },
          el("span", { class: "agent-name" }, a.name),
          el("span", { class: `status-pill ${a.status}`, "data-testid": "agent-status" }, a.status),
        ),
        el("p", { class: "muted small" }, a.id),
        el("p", { class: "agent-task small", "data-testid": "agent-task" }, a.task_title || (a.task_id ? `Task #${a.task_id}` : "No task")),
      ),
    ),
  );
}

function renderTasks() {
  const tasks = Array.from(model.tasks.values()).sort((a, b) => b.id - a.id).slice(0, 12);
  $("#task-list").replaceChildren(
    ...tasks.map((t) =>
      el(
        "tr",
        { "data-testid": "task-row", dataset: { taskId: t.id, status: t.status } },
        el("td", { class: "muted" }, String(t.id)),
        el("td", {}, t.title),
        el("td", { class: "muted small nowrap agent-col" }, (model.agents.get(t.agent_id) || {}).name || t.agent_id || ""),
        el("td", {}, el("span", { class: `task-status ${t.status.toLowerCase()}`, "data-testid": "task-status" }, t.status)),
      ),
    ),
  );
}

function renderActivity() {
  $("#activity-feed").replaceChildren(
    ...model.activity.slice(0, 20).map((entry) =>
      el(
        "li",
        { class: `activity-item ${entry.kind}`, "data-testid": "activity-item", dataset: { key: entry.key } },
        el("span", { class: "activity-text" }, entry.text),
        el("time", { class: "muted small", datetime: entry.at }, relativeTime(entry.at)),
      ),
    ),
  );
}

function renderAll() {
  renderBlockers();
  renderSyncAlert();
  renderAgents();
  renderTasks();
  renderActivity();
}

// --- connection indicator --------------------------------------------------------------------

const STATE_TEXT = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  polling: "Live (polling every 10 s)",
  offline: "Offline",
};

function renderConnection() {
  const bus = window.dashboard.bus;
  const state = bus ? bus.state : "connecting";
  const box = $("#connection");
  box.dataset.state = state;
  // Which transport carries the events (eventbus.js falls back WebSocket -> SSE -> polling).
  const transport = (bus && bus.transport) || "";
  box.dataset.transport = transport;
  let text = STATE_TEXT[state] || state;
  if (state === "live") text = transport === "sse" ? "Live (Server-Sent Events)" : "Live (WebSocket)";
  if (state === "reconnecting" && bus.nextRetryAt) {
    const seconds = Math.max(0, Math.ceil((bus.nextRetryAt - Date.now()) / 1000));
    text = seconds > 0 ? `Reconnecting in ${seconds} s…` : "Reconnecting…";
  }
  $(".connection-text", box).textContent = text;
  $("#retry-now").hidden = !(state === "reconnecting" || state === "polling");
}

// --- toasts and notifications ----------------------------------------------------------------

// Toasts stack in their own corner (style.css keeps it clear of the Activity feed); beyond this
// many the oldest goes at once, so a burst of events never builds a wall over the page.
const MAX_TOASTS = 3;

function toast(text, kind = "info") {
  const node = el("div", { class: `toast ${kind}`, "data-testid": "toast", dataset: { kind }, role: kind === "warning" ? "alert" : "status" },
    el("span", { class: "toast-icon", "aria-hidden": "true" }, kind === "warning" ? "!" : "✓"),
    el("span", {}, text),
  );
  const box = $("#toasts");
  box.prepend(node);
  while (box.children.length > MAX_TOASTS) box.lastElementChild.remove();
  setTimeout(() => node.classList.add("leaving"), 7000);
  setTimeout(() => node.remove(), 7400);
}

let titleTimer = null;
function flashTitle() {
  // A SYNC blocker stops an agent: make it visible from another tab too.
  clearInterval(titleTimer);
  let flips = 0;
  titleTimer = setInterval(() => {
    flips += 1;
    if (flips > 6 || document.hasFocus()) {
      clearInterval(titleTimer);
      renderBlockers();
      return;
    }
    document.title = flips % 2 ? "⚠ SYNC blocker waiting" : `(${model.blockers.size}) Agent dashboard`;
  }, 1000);
}

// --- answer modal ----------------------------------------------------------------------------

function openModal(blockerId) {
  const blocker = model.blockers.get(blockerId);
  if (!blocker) return;
  model.modalBlockerId = blockerId;
  const modal = $("#answer-modal");
  modal.dataset.blockerId = String(blockerId);
  $('[data-testid="modal-title"]').textContent = `Answer blocker #${blocker.id}`;
  const tag = $('[data-testid="modal-type"]');
  tag.textContent = blocker.blocker_type;
  tag.className = `type-tag ${blocker.blocker_type.toLowerCase()}`;
  $('[data-testid="modal-meta"]').textContent = `${blocker.agent_name} · ${blocker.task_title} · ${relativeTime(blocker.created_at)}`;
  $('[data-testid="modal-question"]').textContent = blocker.question;
  const input = $("#answer-input");
  input.value = "";
  setModalError(null);
  setWarning(null);
  updateCounter();
  modal.hidden = false;
  input.focus();
  renderModalPresence();
  reportActivity();
  markSeen(blockerId);
}

function closeModal() {
  model.modalBlockerId = null;
  const modal = $("#answer-modal");
  modal.hidden = true;
  delete modal.dataset.blockerId;
  setWarning(null);
  reportActivity();
}

/** The warning before a second answer: someone else is answering this blocker right now. */
function setWarning(names) {
  const warning = $('[data-testid="answer-warning"]');
  const submit = $('[data-testid="answer-submit"]');
  if (!names) {
    warning.hidden = true;
    model.warnedFor = null;
    submit.textContent = "Send answer";
    return;
  }
  warning.textContent = `${names} ${names.includes(" and ") ? "are" : "is"} answering this blocker too. Send yours anyway?`;
  warning.hidden = false;
  model.warnedFor = model.modalBlockerId;
  submit.textContent = "Send anyway";
}

function setModalError(message) {
  const error = $('[data-testid="answer-error"]');
  error.hidden = !message;
  error.textContent = message || "";
}

function updateCounter() {
  const max = model.config ? model.config.max_answer_length : 5000;
  const length = $("#answer-input").value.length;
  const counter = $('[data-testid="answer-counter"]');
  counter.textContent = `${length} / ${max}`;
  counter.classList.toggle("over", length > max);
}

async function submitAnswer(event) {
  event.preventDefault();
  const blockerId = model.modalBlockerId;
  if (blockerId === null) return;
  const answer = $("#answer-input").value;
  const submit = $('[data-testid="answer-submit"]');
  const answering = othersOn(blockerId).filter((o) => o.answering).map((o) => o.name);
  if (answering.length && model.warnedFor !== blockerId) {
    // Ask once before a second answer; the backend's 409 still settles a real race.
    setWarning(answering.length > 1 ? `${answering.slice(0, -1).join(", ")} and ${answering[answering.length - 1]}` : answering[0]);
    return;
  }
  submit.disabled = true;
  try {
    await api(`/api/blockers/${blockerId}/resolve`, { method: "POST", body: JSON.stringify({ answer }) });
    // The blocker_resolved event does the rest (toast, list); removing it now avoids a flicker.
    model.blockers.delete(blockerId);
    if (model.modalBlockerId === blockerId) closeModal();
    renderAll();
  } catch (error) {
    if (error.status === 409) {
      model.blockers.delete(blockerId);
      closeModal();
      renderAll();
      toast(`Blocker #${blockerId} was already ${(error.body && error.body.status || "handled").toLowerCase()}`, "warning");
    } else if (model.modalBlockerId === blockerId) {
      setModalError(error.status === 422 ? error.message : `Could not send the answer: ${error.message}`);
    }
  } finally {
    submit.disabled = false;
  }
}

// --- start -----------------------------------------------------------------------------------

async function main() {
  model.config = await api("/api/config");
  model.me = loadMe();
  window.dashboard.me = model.me;
  $("#project-name").textContent = `Project ${model.config.project_id}`;
  const myName = $("#my-name");
  myName.value = model.me.name;
  myName.addEventListener("change", () => rename(myName.value));
  $("#answer-input").maxLength = model.config.max_answer_length;
  $("#answer-input").addEventListener("input", () => {
    updateCounter();
    reportActivity();
  });
  $("#answer-form").addEventListener("submit", submitAnswer);
  $('[data-testid="answer-cancel"]').addEventListener("click", closeModal);
  $("#answer-modal").addEventListener("click", (event) => {
    if (event.target.id === "answer-modal") closeModal();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && model.modalBlockerId !== null) closeModal();
  });
  $('[data-testid="sync-alert-answer"]').addEventListener("click", () => openModal(Number($("#sync-alert").dataset.blockerId)));
  $('[data-testid="sync-alert-dismiss"]').addEventListener("click", () => {
    model.dismissedSync.add(Number($("#sync-alert").dataset.blockerId));
    renderSyncAlert();
  });
  $("#retry-now").addEventListener("click", () => window.dashboard.bus && window.dashboard.bus.reconnect());

  // Show what the backend knows at once, even before the gateway answers; the bus calls onResync
  // again once the subscription is live, which is what makes the view gapless from then on.
  loadState().catch((error) => console.warn("initial load failed", error));

  const bus = connect({
    url: model.config.gateway_url,
    httpUrl: model.config.poll_url,
    token: model.config.auth ? fetchToken : undefined,
    onResync,
    onStateChange: renderConnection,
    onError: (error) => console.debug("eventbus:", error.code, error.message || ""),
  });
  window.dashboard.bus = bus;
  bus.subscribe(model.config.project_id, onEvent);
  bus.presence(model.config.project_id, onPresence);
  if (model.config.sandbox_project_id) bus.subscribe(model.config.sandbox_project_id, onSandboxEvent);
  renderSandbox();
  renderConnection();
  // Relative times and the retry countdown tick.
  setInterval(renderConnection, 1000);
  setInterval(() => {
    renderBlockers();
    renderActivity();
  }, 15000);
  window.dashboard.ready = true;
  document.body.dataset.ready = "true";
}

main().catch((error) => {
  console.error(error);
  toast(`The dashboard could not start: ${error.message}`, "warning");
});
