// loopgate console: subscribe to a topic, watch its messages live, publish.
//
// Everything goes through loopgate.js, served by the same loopgate; the page only shows what
// its callbacks say. The token is kept in sessionStorage (this tab only), nothing else is stored.
// No innerHTML anywhere: every value shown (message data included) is set as text.

import { publish, subscribe } from "../client/loopgate.js";

const BASE = new URL("../", import.meta.url).href; // the loopgate that serves this page
const TOPICS_URL = new URL("topics", import.meta.url).href;
const TOKEN_KEY = "loopgate.console.token";
const MAX_ROWS = 500;
const MAX_LOG = 200;
const PROBE_TIMEOUT_MS = 10000;

const $ = (id) => document.getElementById(id);
const ui = {
  token: $("token"),
  topic: $("topic"),
  topicList: $("topic-list"),
  transport: $("transport"),
  subscribeForm: $("subscribe-form"),
  subscribe: $("subscribe"),
  unsubscribe: $("unsubscribe"),
  clear: $("clear"),
  identity: $("identity"),
  error: $("error"),
  state: $("state"),
  publishForm: $("publish-form"),
  publishData: $("publish-data"),
  publishAttributes: $("publish-attributes"),
  publishButton: $("publish"),
  publishResult: $("publish-result"),
  messages: document.querySelector("#messages tbody"),
  count: $("message-count"),
  log: $("status-log"),
};

let subscription = null; // the running Subscription
let current = null; // {topic, transport, token, opened, probing} of the running subscription
let received = 0;

// -- token: this tab only

ui.token.value = sessionStorage.getItem(TOKEN_KEY) ?? "";
ui.token.addEventListener("input", () => {
  const token = ui.token.value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
});
ui.token.addEventListener("change", () => checkToken());

function token() {
  return ui.token.value.trim();
}

// -- the token's topics (GET /console/topics)

/** What the token may use, or null when the server could not tell; shows a refused token. */
async function checkToken() {
  const credential = token();
  if (!credential) {
    ui.identity.textContent = "";
    return null;
  }
  let response;
  try {
    const url = new URL(TOPICS_URL);
    url.searchParams.set("origin", location.origin);
    response = await fetch(url, {
      headers: { Authorization: `Bearer ${credential}` },
      cache: "no-store",
    });
  } catch (error) {
    ui.identity.textContent = `the server cannot be reached (${error.message})`;
    return null;
  }
  if (!response.ok) {
    const message = await errorMessage(response);
    ui.identity.textContent = "";
    if (response.status === 401) {
      showError(`The token was refused (401 Unauthorized): ${message}`);
      return { refused: true };
    }
    return null;
  }
  const access = await response.json();
  clearError();
  ui.topicList.replaceChildren(
    ...access.topics.map((topic) => {
      const option = document.createElement("option");
      option.value = topic.name;
      option.label = [topic.subscribe && "subscribe", topic.publish && "publish"]
        .filter(Boolean)
        .join(", ") || "no access";
      return option;
    }),
  );
  if (!ui.topic.value && access.topics.length) {
    ui.topic.value = (access.topics.find((topic) => topic.subscribe) ?? access.topics[0]).name;
  }
  const topics = access.topics.map((topic) => topic.name).join(", ");
  ui.identity.className = "note ok";
  ui.identity.textContent =
    `token of ${JSON.stringify(access.identity)}` +
    (topics ? `; topics: ${topics}` : "") +
    (access.anyTopic ? (topics ? " (or type another)" : "; type a topic") : "");
  return access;
}

async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    return JSON.parse(text).error.message || response.statusText;
  } catch {
    return text.slice(0, 300) || response.statusText || `HTTP ${response.status}`;
  }
}

// -- errors and state

function showError(text, { warning = false } = {}) {
  ui.error.textContent = text;
  ui.error.className = warning ? "error warning" : "error";
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function setState(kind, text) {
  ui.state.className = `state state-${kind}`;
  ui.state.textContent = text;
  ui.state.dataset.state = kind;
}

function log(text, kind = "") {
  const item = document.createElement("li");
  item.textContent = `${clock(new Date())}  ${text}`;
  if (kind) item.className = kind;
  ui.log.prepend(item);
  while (ui.log.childElementCount > MAX_LOG) ui.log.lastElementChild.remove();
}

/** A refusal told in words: what the status means, then the server's message. */
function explain(status, message) {
  const meaning = {
    400: "Bad request (400)",
    401: "The token was refused (401 Unauthorized)",
    403: "Forbidden (403): the token may not use this topic",
    404: "Not found (404)",
    429: "Too many requests (429)",
    503: "The server is unavailable (503)",
  }[status];
  const text = String(message ?? "").replace(/^\d{3}: /, ""); // loopgate.js's "401: ..."
  return meaning ? `${meaning}: ${text}` : text;
}

// -- subscribing

ui.subscribeForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  stop();
  clearError();
  const topic = ui.topic.value.trim();
  const transport = ui.transport.value;
  if (!topic) return;
  setState("connecting", "checking the token");
  const access = await checkToken();
  if (access?.refused) {
    setState("failed", "token refused");
    return;
  }
  const known = access?.topics?.find((item) => item.name === topic);
  if (access && !access.anyTopic && !known) {
    showError(`Not found (404): topic ${JSON.stringify(topic)} is not served here`);
    setState("failed", "topic not served");
    return;
  }
  if (known && !known.subscribe) {
    showError(explain(403, `this token lacks the scope "subscribe:${topic}"`));
    setState("failed", "forbidden");
    return;
  }
  if (transport === "websocket" && access?.websocketOrigin === false) {
    showError(
      `The server refuses websockets from this page's origin (${location.origin}): add it to ` +
        `LOOPGATE_ALLOWED_ORIGINS, or choose Server-Sent Events.`,
    );
    setState("failed", "origin not allowed");
    return;
  }
  start(topic, transport);
});

ui.unsubscribe.addEventListener("click", () => stop());

function start(topic, transport) {
  current = { topic, transport, token: token(), opened: false, probing: false };
  ui.subscribe.disabled = true;
  ui.unsubscribe.disabled = false;
  log(`subscribing to ${topic} over ${transport}`);
  const mine = current;
  subscription = subscribe(BASE, topic, {
    token: current.token,
    transport,
    onMessage: (message) => {
      if (current === mine) addMessage(message);
    },
    onStatus: (status) => {
      if (current === mine) onStatus(status);
    },
  });
}

function stop() {
  const running = subscription;
  subscription = null;
  running?.close();
  current = null;
  ui.subscribe.disabled = false;
  ui.unsubscribe.disabled = true;
}

function onStatus(status) {
  switch (status.state) {
    case "connecting":
      current.opened = false;
      setState("connecting", `connecting (attempt ${status.attempt})`);
      break;
    case "open": {
      if (status.dropped) {
        log(`the server dropped ${status.dropped} messages: this page read too slowly`, "bad");
        break;
      }
      current.opened = true;
      let text = "open";
      if (status.resumed) {
        text += status.complete
          ? ", resumed, complete"
          : `, resumed, incomplete${status.earliest ? `: messages before ${status.earliest} are gone` : ""}`;
      }
      setState("open", text);
      log(text, "open");
      if (status.error) {
        showError(`The resume point was refused: messages may be missing (${status.error.message})`, {
          warning: true,
        });
      } else {
        clearError();
      }
      break;
    }
    case "reconnecting": {
      const why = [
        status.code ? `closed with ${status.code}` : "",
        status.reason,
        status.error?.message,
      ]
        .filter(Boolean)
        .join(": ");
      const text = `reconnecting: attempt ${status.attempt} in ${status.delayMs} ms`;
      setState("reconnecting", text);
      log(why ? `${text} (${why})` : text);
      if (!current.opened && current.transport === "websocket") diagnose(current);
      break;
    }
    case "closed":
      if (status.error) {
        const text = explain(status.error.status ?? status.code, status.error.message);
        setState("failed", "closed: refused");
        showError(text);
        log(`closed: ${text}`, "bad");
      } else {
        setState("closed", "closed");
        log("closed");
      }
      if (current) stop();
      break;
    default:
      break;
  }
}

/**
 * A browser's WebSocket never tells why its handshake failed. Ask the same stream over HTTP
 * (its first bytes only): a refusal there (401, 403, 404...) stops the subscription with the
 * server's own words; a server out of reach is said, and loopgate.js goes on retrying.
 */
async function diagnose(attempt) {
  if (attempt.probing) return;
  attempt.probing = true;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), PROBE_TIMEOUT_MS);
  let outcome;
  try {
    const url = `${BASE}v1/topics/${encodeURIComponent(attempt.topic)}/events`;
    const headers = { Accept: "text/event-stream" };
    if (attempt.token) headers.Authorization = `Bearer ${attempt.token}`;
    const response = await fetch(url, { headers, signal: controller.signal, cache: "no-store" });
    outcome = response.ok
      ? { ok: true }
      : { status: response.status, message: await errorMessage(response) };
  } catch (error) {
    outcome = { unreachable: true, message: error.message };
  } finally {
    controller.abort();
    clearTimeout(timer);
    attempt.probing = false;
  }
  if (current !== attempt || attempt.opened) return;
  // Allowed over HTTP, from an origin allowed (checked before subscribing): the server was busy
  // or is just back, and the next attempt tells.
  if (outcome.ok) return;
  if (outcome.unreachable) {
    showError(`The server cannot be reached; retrying.`, { warning: true });
  } else if (outcome.status >= 400 && outcome.status < 500 && outcome.status !== 429) {
    const text = explain(outcome.status, outcome.message);
    stop();
    setState("failed", "closed: refused");
    showError(text);
    log(`closed: ${text}`, "bad");
  } else {
    showError(explain(outcome.status, outcome.message), { warning: true });
  }
}

// -- messages

ui.clear.addEventListener("click", () => {
  ui.messages.replaceChildren();
  received = 0;
  ui.count.textContent = "0";
});

function addMessage(message) {
  const now = Date.now();
  const row = document.createElement("tr");
  row.dataset.messageId = message.messageId;
  const published = parseTime(message.publishTime);
  const attributes = Object.entries(message.attributes ?? {})
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([key, value]) => `${key}=${value}`)
    .join("\n");
  const cells = [
    [clock(new Date(now)), "received"],
    [message.id ?? "", "cursor"],
    [message.messageId, "message-id"],
    [message.publishTime ?? "", "publish-time"],
    [published === null ? "" : latency(now - published), "latency"],
    [attributes, "attributes"],
  ];
  for (const [text, kind] of cells) {
    const cell = document.createElement("td");
    cell.className = kind;
    cell.textContent = text;
    if (kind === "cursor") cell.title = text;
    row.append(cell);
  }
  row.append(dataCell(message.data ?? ""));
  row.className = "new";
  setTimeout(() => row.classList.remove("new"), 1500);
  ui.messages.prepend(row);
  while (ui.messages.childElementCount > MAX_ROWS) ui.messages.lastElementChild.remove();
  received += 1;
  ui.count.textContent = String(received);
}

/** The payload as text when it is UTF-8, else as the base64 it came as. */
function dataCell(base64) {
  const cell = document.createElement("td");
  cell.className = "data";
  let bytes;
  try {
    bytes = Uint8Array.from(atob(base64), (char) => char.charCodeAt(0));
  } catch {
    cell.textContent = base64;
    return cell;
  }
  try {
    cell.textContent = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    const label = document.createElement("span");
    label.className = "binary";
    label.textContent = `${bytes.length} bytes, base64: `;
    cell.append(label, base64);
  }
  return cell;
}

function parseTime(text) {
  if (!text) return null;
  // Pub/Sub gives microseconds (or nanoseconds); Date.parse is sure of milliseconds only.
  const parsed = Date.parse(String(text).replace(/(\.\d{3})\d+/, "$1"));
  return Number.isNaN(parsed) ? null : parsed;
}

function latency(ms) {
  if (ms < 10000) return `${Math.round(ms)} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${(ms / 60000).toFixed(1)} min`;
}

function clock(date) {
  const pad = (value, size = 2) => String(value).padStart(size, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

// -- publishing

ui.publishForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const topic = ui.topic.value.trim();
  if (!topic) {
    result("choose a topic first", "bad");
    return;
  }
  let attributes;
  try {
    attributes = parseAttributes(ui.publishAttributes.value);
  } catch (error) {
    result(error.message, "bad");
    return;
  }
  const message = { data: ui.publishData.value };
  if (Object.keys(attributes).length) message.attributes = attributes;
  ui.publishButton.disabled = true;
  try {
    const [messageId] = await publish(BASE, topic, [message], { token: token() });
    result(`published to ${topic}: messageId ${messageId}`, "ok");
  } catch (error) {
    result(`not published: ${explain(error.status, error.message)}`, "bad");
  } finally {
    ui.publishButton.disabled = false;
  }
});

/** `key=value` lines (blank lines skipped) as an attributes object. */
function parseAttributes(text) {
  const attributes = {};
  text.split(/\r?\n/).forEach((line, index) => {
    if (!line.trim()) return;
    const equals = line.indexOf("=");
    if (equals < 1) throw new Error(`attributes, line ${index + 1}: expected key=value`);
    attributes[line.slice(0, equals).trim()] = line.slice(equals + 1);
  });
  return attributes;
}

function result(text, kind) {
  ui.publishResult.className = `note ${kind}`;
  ui.publishResult.textContent = text;
}

// -- start

if (token()) checkToken();
