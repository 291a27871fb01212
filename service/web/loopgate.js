/**
 * loopgate.js: subscribe to and publish on a loopgate, from a browser or Node 20+.
 *
 * One dependency-free ES module, served by loopgate at `/client/loopgate.js`.
 *
 *   import { subscribe, publish } from "https://loopgate.example.com/client/loopgate.js";
 *
 *   const sub = subscribe("https://loopgate.example.com", "orders", {
 *     token: "TOKEN",
 *     onMessage: (msg) => console.log(msg.messageId, msg.text, msg.attributes),
 *     onStatus: (status) => console.log(status.state, status),
 *   });
 *   const base = "https://loopgate.example.com";
 *   await publish(base, "orders", [{ data: "hello" }], { token: "TOKEN" });
 *   sub.close();
 *
 * subscribe(baseUrl, topic, options) returns a Subscription:
 *   { close(), lastEventId, closed, state }.
 * Options:
 *   token           the API token or JWT; or a function (sync or async) called before each
 *                   connection, for tokens that expire.
 *   transport       'websocket' (default) or 'sse'.
 *   onMessage(msg)  each message once: { id, messageId, data, attributes, orderingKey,
 *                   publishTime, text, bytes() }. `data` is the base64 string the server sends;
 *                   `text` its UTF-8 decoding, `bytes()` its bytes (a Uint8Array).
 *   onStatus(s)     every change: { state, attempt, delayMs, code, reason, resumed, complete,
 *                   earliest, dropped, error }, state one of 'connecting', 'open' (with the
 *                   subscribed frame's resumed, complete and earliest; also sent with `dropped`,
 *                   the number of messages the server dropped for a slow reader), 'reconnecting'
 *                   (with the delay before the next attempt and why: code, reason, error),
 *                   'closed' (final; `error` is null after close(), else why it stopped).
 *   lastEventId     a cursor to resume from (a message's `id`, or Subscription.lastEventId).
 *   dedupeWindow    how many recent messageIds are remembered to drop duplicates (1000; 0: off).
 *   initialDelayMs, maxDelayMs   the reconnect backoff (250, 30000).
 *   WebSocket, EventSource, fetch   constructors and function to use instead of the globals
 *                   (Node 20 has no WebSocket: pass the `ws` package's).
 *
 * Transports. The websocket sends the token as `?access_token=` (browsers cannot set headers on
 * a websocket); with the `ws` package it sends `Authorization` instead, and reads the status and
 * `Retry-After` of a refused handshake. 'sse' reads the event stream with `fetch` (sending
 * `Authorization` and `Last-Event-ID`, and seeing every status), unless an `EventSource`
 * constructor is passed, which is then used with `?access_token=` and `?lastEventId=` (and which
 * hides the status of a refusal).
 *
 * Reconnecting. The client resumes from the `id` of the last message it received (before the
 * first message, from the `subscribed` frame's), so nothing is missed, and drops messages whose
 * messageId it has seen among the last `dedupeWindow`. Delays follow exponential backoff with full
 * jitter (a random delay up to initialDelayMs * 2^(failures-1), at most maxDelayMs); after a
 * normal close (1000: idle; 1001: the server going away; an SSE stream ended) it reconnects at
 * once, within a small random delay (up to initialDelayMs). 1013 (try again later), 1011 and
 * network errors back off; 429 and 503 wait at least their Retry-After. 1008 (policy: auth,
 * scope, a bad request) and HTTP 400, 401, 403, 404 and other 4xx stop the subscription with
 * state 'closed' and an `error`, except that a resume cursor refused with 400 is dropped once:
 * the client reconnects without it, and reports the gap with `complete: false` and the `error`.
 * A browser's WebSocket cannot see why a handshake failed: it backs off and retries (use 'sse'
 * to see the refusal).
 *
 * publish(baseUrl, topic, messages, { token, fetch }) publishes [{ data, attributes, orderingKey }]
 * (data a string, sent as its UTF-8 bytes, or a Uint8Array/ArrayBuffer) and resolves to the
 * messageIds; a refusal rejects with a LoopgateError { status, code, retryAfter, message }.
 */

const WS_NORMAL = 1000;
const WS_GOING_AWAY = 1001;
const WS_POLICY_VIOLATION = 1008;

/** An error answered by loopgate (or a websocket closed by it). */
export class LoopgateError extends Error {
  /**
   * @param {string} message
   * @param {{status?: number|null, code?: string|number|null, retryAfter?: number|null}} [details]
   */
  constructor(message, { status = null, code = null, retryAfter = null } = {}) {
    super(message);
    this.name = "LoopgateError";
    this.status = status; // the HTTP status, or null for a websocket close
    this.code = code; // the error's status name (PERMISSION_DENIED...) or the close code
    this.retryAfter = retryAfter; // seconds, when the server said
  }
}

/** A received message. */
export class Message {
  constructor(frame) {
    this.id = frame.id ?? null;
    this.messageId = frame.messageId;
    this.data = frame.data ?? "";
    this.attributes = frame.attributes ?? {};
    this.orderingKey = frame.orderingKey ?? "";
    this.publishTime = frame.publishTime ?? null;
  }

  /** The payload's bytes. */
  bytes() {
    return fromBase64(this.data);
  }

  /** The payload decoded as UTF-8 (invalid bytes become U+FFFD). */
  get text() {
    return new TextDecoder().decode(this.bytes());
  }
}

/**
 * Subscribe to a topic; see the module's documentation for the options.
 * @returns {Subscription}
 */
export function subscribe(baseUrl, topic, options = {}) {
  return new Subscription(baseUrl, topic, options);
}

/**
 * Publish messages to a topic; resolves to their messageIds.
 * @param {string} baseUrl
 * @param {string} topic
 * @param {Array<{data?: string|Uint8Array|ArrayBuffer, attributes?: Object<string,string>,
 *   orderingKey?: string}>} messages
 * @param {{token?: string|Function, fetch?: Function}} [options]
 * @returns {Promise<string[]>}
 */
export async function publish(baseUrl, topic, messages, { token, fetch: fetchFn } = {}) {
  const doFetch = fetchFn ?? globalThis.fetch;
  if (typeof doFetch !== "function") throw new TypeError("publish() needs fetch");
  const body = {
    messages: Array.from(messages, (message) => {
      const item = { data: toBase64(message.data ?? "") };
      if (message.attributes) item.attributes = message.attributes;
      if (message.orderingKey) item.orderingKey = message.orderingKey;
      return item;
    }),
  };
  const headers = { "Content-Type": "application/json" };
  const credential = await resolveToken(token);
  if (credential) headers.Authorization = `Bearer ${credential}`;
  const response = await doFetch(`${base(baseUrl)}${topicPath(topic)}:publish`, {
    method: "POST",
    headers,
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw httpError(response.status, response.headers.get("Retry-After"), text);
  return JSON.parse(text).messageIds;
}

/** A running subscription: it reconnects until close() or a refusal that retrying cannot fix. */
export class Subscription {
  #base;
  #topic;
  #options;
  #cursor;
  #cursorRefused = null; // the error of a refused cursor, reported with the next 'open'
  #cursorDropped = false;
  #seen;
  #state = "connecting";
  #failures = 0;
  #connection = null;
  #timer = null;
  #stopped = false;
  #resolveClosed;

  constructor(baseUrl, topic, options = {}) {
    this.#base = base(baseUrl);
    this.#topic = String(topic);
    this.#options = {
      transport: "websocket",
      dedupeWindow: 1000,
      initialDelayMs: 250,
      maxDelayMs: 30000,
      ...options,
    };
    if (!["websocket", "sse"].includes(this.#options.transport)) {
      throw new TypeError(`unknown transport ${this.#options.transport}: 'websocket' or 'sse'`);
    }
    this.#cursor = options.lastEventId || null;
    this.#seen = new RecentIds(this.#options.dedupeWindow);
    /** Resolves once the subscription has stopped for good (close(), or a refusal). */
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
    this.#connect();
  }

  /** The cursor to resume from: the last message's `id` (or the subscribed frame's). */
  get lastEventId() {
    return this.#cursor;
  }

  /** 'connecting', 'open', 'reconnecting' or 'closed'. */
  get state() {
    return this.#state;
  }

  /** Stop: close the connection and reconnect no more. */
  close() {
    this.#stop(null);
  }

  #status(state, fields = {}) {
    this.#state = state;
    const status = {
      state,
      attempt: this.#failures + 1,
      delayMs: 0,
      code: null,
      reason: "",
      resumed: null,
      complete: null,
      earliest: null,
      dropped: 0,
      error: null,
      ...fields,
    };
    try {
      this.#options.onStatus?.(status);
    } catch (error) {
      console.error("loopgate: onStatus threw", error);
    }
  }

  async #connect() {
    if (this.#stopped) return;
    this.#status("connecting");
    let token;
    try {
      token = await resolveToken(this.#options.token);
    } catch (error) {
      this.#ended({ kind: "error", error, opened: false });
      return;
    }
    if (this.#stopped) return;
    let connection = null;
    const handlers = {
      text: (text) => this.#onText(text),
      end: (outcome) => {
        if (this.#connection === connection) this.#connection = null;
        this.#ended(outcome);
      },
    };
    const target = { base: this.#base, topic: this.#topic, token, cursor: this.#cursor };
    try {
      if (this.#options.transport === "websocket") {
        connection = openWebSocket(target, this.#options, handlers);
      } else if (this.#options.EventSource) {
        connection = openEventSource(target, this.#options, handlers);
      } else {
        connection = openEventStream(target, this.#options, handlers);
      }
    } catch (error) {
      this.#stop(error); // no WebSocket or fetch to use, or a bad URL: retrying cannot help
      return;
    }
    this.#connection = connection;
  }

  #onText(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // not one of loopgate's frames
    }
    if (!frame || typeof frame !== "object") return;
    if (frame.type === "subscribed") {
      if (frame.id) this.#cursor = frame.id;
      if (this.#connection) this.#connection.opened = true;
      const refused = this.#cursorRefused;
      this.#cursorRefused = null;
      this.#status("open", {
        resumed: Boolean(frame.resumed),
        complete: refused ? false : frame.complete !== false,
        earliest: frame.earliest ?? null,
        error: refused,
      });
    } else if (frame.type === "message") {
      this.#deliver(frame);
    } else if (frame.type === "messages" && Array.isArray(frame.messages)) {
      for (const item of frame.messages) this.#deliver(item);
    } else if (frame.type === "dropped") {
      this.#status("open", { dropped: Number(frame.count) || 0 });
    }
  }

  #deliver(frame) {
    if (this.#stopped) return;
    if (frame.id) this.#cursor = frame.id;
    this.#failures = 0;
    if (!this.#seen.add(frame.messageId)) return;
    try {
      this.#options.onMessage?.(new Message(frame));
    } catch (error) {
      console.error("loopgate: onMessage threw", error);
    }
  }

  /** What to do once a connection ended: stop, or reconnect after a delay. */
  #ended(outcome) {
    if (this.#stopped) return;
    const { initialDelayMs, maxDelayMs } = this.#options;
    const small = () => Math.random() * initialDelayMs;
    const backoff = () => {
      this.#failures += 1;
      return Math.random() * Math.min(maxDelayMs, initialDelayMs * 2 ** (this.#failures - 1));
    };
    let delayMs;
    const fields = { code: null, reason: "", error: null };
    if (outcome.kind === "refused") {
      const { status } = outcome;
      const error = httpError(status, outcome.retryAfter, outcome.body);
      fields.code = status;
      fields.reason = error.message;
      fields.error = error;
      if (status === 400 && this.#cursor && !this.#cursorDropped) {
        this.#cursorDropped = true;
        this.#cursor = null;
        this.#cursorRefused = error;
        delayMs = 0;
      } else if (status === 429 || status === 503) {
        const retryAfterMs = error.retryAfter === null ? 0 : error.retryAfter * 1000;
        delayMs = Math.max(retryAfterMs + small(), backoff());
      } else if (status >= 400 && status < 500) {
        this.#stop(error);
        return;
      } else {
        delayMs = backoff();
      }
    } else if (outcome.kind === "close") {
      fields.code = outcome.code;
      fields.reason = outcome.reason || "";
      if (outcome.code === WS_POLICY_VIOLATION) {
        this.#stop(new LoopgateError(outcome.reason || "policy violation", { code: 1008 }), fields);
        return;
      }
      if (outcome.opened && (outcome.code === WS_NORMAL || outcome.code === WS_GOING_AWAY)) {
        this.#failures = 0;
        delayMs = small();
      } else {
        fields.error = outcome.error ?? null;
        delayMs = backoff();
      }
    } else if (outcome.kind === "ended" && outcome.opened) {
      this.#failures = 0; // an SSE stream the server ended (a shutdown, a deploy)
      delayMs = small();
    } else {
      fields.error = outcome.error ?? null;
      delayMs = backoff();
    }
    this.#status("reconnecting", { ...fields, delayMs: Math.round(delayMs) });
    this.#timer = setTimeout(() => {
      this.#timer = null;
      this.#connect();
    }, delayMs);
  }

  #stop(error, fields = {}) {
    if (this.#stopped) return;
    this.#stopped = true;
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
    const connection = this.#connection;
    this.#connection = null;
    connection?.close();
    this.#status("closed", { ...fields, error: error ?? null });
    this.#resolveClosed();
  }
}

// -- transports: each calls handlers.text(frame text) per frame, then handlers.end(outcome) once.
// An outcome is {kind: 'close', code, reason, opened, error} (websocket), {kind: 'refused',
// status, retryAfter, body}, {kind: 'ended', opened} (an event stream that ended) or
// {kind: 'error', error, opened}.

function openWebSocket(target, options, handlers) {
  const WebSocketClass = options.WebSocket ?? globalThis.WebSocket;
  if (typeof WebSocketClass !== "function") {
    throw new TypeError("no WebSocket: pass options.WebSocket (in Node 20, the ws package's)");
  }
  // The ws package (an EventEmitter) takes headers, and tells a refused handshake's status.
  const isNodeWs = typeof WebSocketClass.prototype?.on === "function";
  const url = new URL(`${target.base}${topicPath(target.topic)}/stream`);
  if (url.protocol === "https:") url.protocol = "wss:";
  else if (url.protocol === "http:") url.protocol = "ws:";
  if (target.cursor) url.searchParams.set("lastEventId", target.cursor);
  let socket;
  if (isNodeWs) {
    const headers = target.token ? { Authorization: `Bearer ${target.token}` } : {};
    socket = new WebSocketClass(url.href, [], { headers });
  } else {
    if (target.token) url.searchParams.set("access_token", target.token);
    socket = new WebSocketClass(url.href);
  }
  const connection = { opened: false, close: () => socket.close(WS_NORMAL) };
  let refusal = null;
  let failure = null;
  let done = false;
  const end = (outcome) => {
    if (done) return;
    done = true;
    handlers.end(outcome);
  };
  if (isNodeWs) {
    socket.on("unexpected-response", (request, response) => {
      let body = "";
      let finished = false;
      const finish = () => {
        if (finished) return;
        finished = true;
        refusal = {
          kind: "refused",
          status: response.statusCode,
          retryAfter: response.headers["retry-after"] ?? null,
          body,
        };
        socket.terminate();
      };
      response.setEncoding("utf8");
      response.on("data", (chunk) => {
        if (body.length < 8192) body += chunk;
      });
      response.on("end", finish);
      response.on("close", finish);
      response.on("error", finish);
    });
  }
  socket.onmessage = (event) => {
    if (typeof event.data === "string") handlers.text(event.data);
  };
  socket.onerror = (event) => {
    failure = event?.error ?? new Error(event?.message || "websocket error");
  };
  socket.onclose = (event) => {
    if (refusal) {
      end(refusal);
      return;
    }
    end({
      kind: "close",
      code: event.code,
      reason: event.reason,
      opened: connection.opened,
      error: event.code === WS_NORMAL || event.code === WS_GOING_AWAY ? null : failure,
    });
  };
  return connection;
}

function openEventSource(target, options, handlers) {
  const url = new URL(`${target.base}${topicPath(target.topic)}/events`);
  if (target.token) url.searchParams.set("access_token", target.token);
  if (target.cursor) url.searchParams.set("lastEventId", target.cursor);
  const source = new options.EventSource(url.href);
  let done = false;
  const connection = {
    opened: false,
    close: () => {
      done = true;
      source.close();
    },
  };
  source.onmessage = (event) => handlers.text(event.data);
  source.onerror = () => {
    // It would reconnect by itself: this client reconnects instead, with its cursor and backoff.
    source.close();
    if (done) return;
    done = true;
    handlers.end(
      connection.opened
        ? { kind: "ended", opened: true }
        : { kind: "error", error: new Error("the event stream failed to open"), opened: false },
    );
  };
  return connection;
}

function openEventStream(target, options, handlers) {
  const doFetch = options.fetch ?? globalThis.fetch;
  if (typeof doFetch !== "function") throw new TypeError("no fetch: pass options.fetch");
  const controller = new AbortController();
  const connection = { opened: false, close: () => controller.abort() };
  const headers = { Accept: "text/event-stream" };
  if (target.token) headers.Authorization = `Bearer ${target.token}`;
  if (target.cursor) headers["Last-Event-ID"] = target.cursor;
  (async () => {
    let outcome;
    try {
      const response = await doFetch(`${target.base}${topicPath(target.topic)}/events`, {
        headers,
        signal: controller.signal,
      });
      if (!response.ok) {
        const body = await response.text().catch(() => "");
        outcome = {
          kind: "refused",
          status: response.status,
          retryAfter: response.headers.get("Retry-After"),
          body,
        };
      } else {
        const parser = new EventStreamParser((data) => handlers.text(data));
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.feed(decoder.decode(value, { stream: true }));
        }
        outcome = { kind: "ended", opened: connection.opened };
      }
    } catch (error) {
      outcome = { kind: "error", error, opened: connection.opened };
    }
    if (!controller.signal.aborted) handlers.end(outcome);
  })();
  return connection;
}

/** Server-Sent Events (the WHATWG event stream format): calls onData with each event's data. */
export class EventStreamParser {
  #onData;
  #buffer = "";
  #data = [];

  constructor(onData) {
    this.#onData = onData;
  }

  feed(chunk) {
    this.#buffer += chunk;
    const lines = this.#buffer.split(/\r\n|\r|\n/);
    this.#buffer = lines.pop(); // an incomplete line
    // A chunk ending in \r may be the first half of \r\n: keep the line until the next chunk.
    if (this.#buffer === "" && chunk.endsWith("\r") && lines.length) {
      this.#buffer = `${lines.pop()}\r`;
    }
    for (const line of lines) this.#line(line);
  }

  #line(line) {
    if (line === "") {
      if (this.#data.length) this.#onData(this.#data.join("\n"));
      this.#data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment (the heartbeat)
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.#data.push(value);
    // id, event and retry: the frames carry their own id and type; this client sets its delays.
  }
}

// -- helpers

/** The last `size` distinct ids, oldest forgotten first. */
class RecentIds {
  #size;
  #ids = new Set();

  constructor(size) {
    this.#size = Math.max(0, Number(size) || 0);
  }

  /** False when `id` is among the remembered ones (then it becomes the most recent). */
  add(id) {
    if (!this.#size || id === undefined || id === null) return true;
    if (this.#ids.has(id)) {
      this.#ids.delete(id);
      this.#ids.add(id);
      return false;
    }
    this.#ids.add(id);
    if (this.#ids.size > this.#size) this.#ids.delete(this.#ids.values().next().value);
    return true;
  }
}

function base(baseUrl) {
  let url = String(baseUrl ?? "");
  if (!/^[a-z][a-z0-9+.-]*:/i.test(url) && globalThis.location) {
    url = new URL(url || "/", globalThis.location.href).href; // relative to the page
  }
  return url.replace(/\/+$/, "");
}

function topicPath(topic) {
  return `/v1/topics/${encodeURIComponent(topic)}`;
}

async function resolveToken(token) {
  const value = typeof token === "function" ? await token() : token;
  return value ? String(value) : null;
}

/** Seconds of a Retry-After header (a number or an HTTP date), or null. */
function parseRetryAfter(value) {
  if (value === null || value === undefined || value === "") return null;
  const text = String(value).trim();
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text);
  const date = Date.parse(text);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

function httpError(status, retryAfter, bodyText) {
  let message = `HTTP ${status}`;
  let code = null;
  try {
    const error = JSON.parse(bodyText).error;
    if (error?.message) message = `${status}: ${error.message}`;
    code = error?.status ?? null;
  } catch {
    // not loopgate's JSON error (a proxy's page, an empty body)
  }
  return new LoopgateError(message, { status, code, retryAfter: parseRetryAfter(retryAfter) });
}

function toBase64(data) {
  let bytes;
  if (typeof data === "string") bytes = new TextEncoder().encode(data);
  else if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
  else if (ArrayBuffer.isView(data)) {
    bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  }
  else throw new TypeError("a message's data must be a string, a Uint8Array or an ArrayBuffer");
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
