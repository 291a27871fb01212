// Load client for bench/resume.py: N websocket subscribers on instance A, a publisher through
// instance B, and a reconnect to B with ?lastEventId= when A closes them (SIGTERM, as a deploy).
// Prints JSON lines: {"event": "subscribed"} once all N are subscribed on A (the parent then
// SIGTERMs A after WARMUP_S), and {"event": "result", ...} at the end, then exits.
// usage: node resume_client.js URL_A URL_B TOPIC CLIENTS RATE WARMUP_S AFTER_S
//   RATE: messages per second published through B (one request each, ten at a time at most);
//   AFTER_S: seconds the publisher goes on after the first close from A.
// Every message published (answered 200) must reach every client; a client has "caught up" once it
// holds every message answered before its new connection to B was subscribed.
"use strict";
const WebSocket = require("ws");
const [urlA, urlB, topic] = process.argv.slice(2, 5);
const [clients, rate, warmup, after] = process.argv.slice(5, 9).map(Number);
const wsPath = (base) => base.replace(/^http/, "ws") + `/v1/topics/${topic}/stream`;
const now = () => performance.now();

const answered = []; // seq -> time (performance.now()) it was answered 200, or undefined
let answeredCount = 0, publishFailed = 0, published = 0, firstClose = null;
let publishing = true, highestAnswered = -1;

class Client {
  constructor(index) {
    this.index = index;
    this.seen = new Uint8Array(1 << 16);
    this.contiguous = -1; // every seq <= contiguous was received
    this.received = 0; this.duplicates = 0; this.replayed = 0;
    this.lastId = null; this.closedAt = null; this.resubscribedAt = null;
    this.needUpTo = null; this.caughtUpAt = null; this.reconnects = 0; this.closeCodes = [];
    this.resumed = null; this.complete = null;
    this.open(wsPath(urlA), true);
  }
  open(url, first) {
    const ws = new WebSocket(first || !this.lastId ? url : `${url}?lastEventId=${encodeURIComponent(this.lastId)}`);
    this.ws = ws;
    ws.on("message", (raw) => this.onFrame(JSON.parse(raw), first));
    ws.on("error", () => {});
    ws.on("close", (code) => {
      this.closeCodes.push(code);
      if (!first || this.closedAt !== null) { if (!finished) this.retry(); return; }
      this.closedAt = now();
      if (firstClose === null) firstClose = this.closedAt;
      // A deploy's 1001: reconnect to the next instance at once, with a little jitter.
      setTimeout(() => this.open(wsPath(urlB), false), Math.random() * 100);
    });
  }
  retry() {
    this.reconnects++;
    setTimeout(() => this.open(wsPath(urlB), false), 200 + Math.random() * 300);
  }
  onFrame(frame, first) {
    if (frame.type === "subscribed") {
      if (this.lastId === null) this.lastId = frame.id;
      if (first) { subscribedOnA++; if (subscribedOnA === clients) announce(); return; }
      this.resubscribedAt = now();
      this.resumed = frame.resumed; this.complete = frame.complete;
      if (this.needUpTo === null) this.needUpTo = highestAnswered;
      this.check();
      return;
    }
    const items = frame.type === "message" ? [frame] : frame.type === "messages" ? frame.messages : [];
    for (const m of items) {
      const seq = Number(Buffer.from(m.data, "base64").toString());
      if (seq >= this.seen.length) { const grown = new Uint8Array(seq * 2); grown.set(this.seen); this.seen = grown; }
      if (this.seen[seq]) { this.duplicates++; } else {
        this.seen[seq] = 1; this.received++;
        if (this.resubscribedAt !== null && answered[seq] !== undefined && answered[seq] < this.resubscribedAt) this.replayed++;
      }
      this.lastId = m.id;
    }
    while (this.seen[this.contiguous + 1]) this.contiguous++;
    this.check();
  }
  check() {
    if (this.caughtUpAt !== null || this.needUpTo === null) return;
    // Caught up: every message answered 200 before the new subscription is here.
    let upTo = this.contiguous;
    while (upTo < this.needUpTo && (this.seen[upTo + 1] || answered[upTo + 1] === undefined)) upTo++;
    if (upTo >= this.needUpTo) this.caughtUpAt = now();
  }
  missing() {
    let n = 0;
    for (let seq = 0; seq < answered.length; seq++) if (answered[seq] !== undefined && !this.seen[seq]) n++;
    return n;
  }
}

let subscribedOnA = 0, finished = false;
const all = [];
for (let i = 0; i < clients; i++) all.push(new Client(i));
const started = now();
const connectTimer = setTimeout(() => {
  console.error(`only ${subscribedOnA} of ${clients} subscribed on A`);
  finish(2);
}, 120_000);

function announce() {
  clearTimeout(connectTimer);
  process.stdout.write(JSON.stringify({ event: "subscribed", seconds: (now() - started) / 1000 }) + "\n");
  startPublisher();
  setTimeout(() => process.stdout.write(JSON.stringify({ event: "signal" }) + "\n"), warmup * 1000);
  const waitClose = setInterval(() => {
    if (firstClose === null) return;
    clearInterval(waitClose);
    setTimeout(() => { publishing = false; drain(); }, after * 1000);
  }, 20);
}

function startPublisher() {
  let inFlight = 0;
  const t0 = now();
  const tick = setInterval(() => {
    if (!publishing) { clearInterval(tick); return; }
    const due = Math.floor(((now() - t0) / 1000) * rate) - published;
    for (let k = 0; k < due && inFlight < 10; k++) {
      const seq = published++;
      inFlight++;
      fetch(`${urlB}/v1/topics/${topic}:publish`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ messages: [{ data: Buffer.from(String(seq)).toString("base64") }] }),
      }).then(async (r) => {
        await r.arrayBuffer();
        if (r.status === 200) { answered[seq] = now(); answeredCount++; if (seq > highestAnswered) highestAnswered = seq; }
        else publishFailed++;
      }, () => { publishFailed++; }).finally(() => { inFlight--; });
    }
  }, 10);
}

function drain() {
  // Publishing has stopped: wait (at most 15 s) for every client to hold every answered message.
  const deadline = now() + 15_000;
  const poll = setInterval(() => {
    const done = all.every((c) => c.missing() === 0);
    if (done || now() > deadline) { clearInterval(poll); finish(0); }
  }, 100);
}

function finish(code) {
  finished = true;
  const catchUp = all.filter((c) => c.caughtUpAt !== null).map((c) => (c.caughtUpAt - firstClose) / 1000).sort((a, b) => a - b);
  const reconnect = all.filter((c) => c.resubscribedAt !== null).map((c) => (c.resubscribedAt - c.closedAt) / 1000).sort((a, b) => a - b);
  const q = (xs, p) => (xs.length ? xs[Math.min(xs.length - 1, Math.floor(p * xs.length))] : null);
  const replayed = all.reduce((s, c) => s + c.replayed, 0);
  const lastCaughtUp = catchUp.length ? catchUp[catchUp.length - 1] : null;
  const result = {
    event: "result", clients, rate, answered: answeredCount, publish_failed: publishFailed,
    closed_by_a: all.filter((c) => c.closedAt !== null).length,
    close_codes: [...new Set(all.map((c) => c.closeCodes[0]))],
    resubscribed: all.filter((c) => c.resubscribedAt !== null).length,
    resumed_complete: all.filter((c) => c.resumed && c.complete).length,
    caught_up: catchUp.length, catch_up_p50_s: q(catchUp, 0.5), catch_up_max_s: lastCaughtUp,
    reconnect_p50_s: q(reconnect, 0.5), reconnect_max_s: reconnect.length ? reconnect[reconnect.length - 1] : null,
    replayed, replayed_per_s: lastCaughtUp ? replayed / lastCaughtUp : null,
    missing: all.reduce((s, c) => s + c.missing(), 0),
    clients_missing: all.filter((c) => c.missing() > 0).length,
    duplicates: all.reduce((s, c) => s + c.duplicates, 0),
    duplicates_max: Math.max(...all.map((c) => c.duplicates)),
    extra_reconnects: all.reduce((s, c) => s + c.reconnects, 0),
  };
  process.stdout.write(JSON.stringify(result) + "\n");
  for (const c of all) c.ws.terminate();
  setTimeout(() => process.exit(code), 200);
}
