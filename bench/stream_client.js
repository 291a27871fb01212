// Load client for bench/stream.py: N websocket subscribers on one URL. Counts messages and measures
// publish-to-receive latency from each message's publishTime. Prints one JSON line, then exits.
// usage: node stream_client.js URL CLIENTS WARMUP_S MEASURE_S [CONNECT_S]
// CONNECT_S (default 60) bounds the wait for every client to open; the run goes on with those open.
// BENCH_OFFER_DEFLATE=1 makes the clients offer permessage-deflate, as browsers do.
"use strict";
const WebSocket = require("ws");
const [url, clients, warmup, measure] = [process.argv[2], +process.argv[3], +process.argv[4], +process.argv[5]];
const connectMs = 1000 * (+process.argv[6] || 60);
let open = 0, failed = 0, closed = 0, delivered = 0, dropped = 0, deflated = 0, measuring = false;
const lat = [];
function onMessage(data) {
  const now = Date.now();
  const frame = JSON.parse(data);
  let items;
  if (frame.type === "message") items = [frame];
  else if (frame.type === "messages") items = frame.messages;
  else { if (frame.type === "dropped" && measuring) dropped += frame.count; return; }
  if (!measuring) return;
  delivered += items.length;
  for (const m of items) lat.push(now - Date.parse(m.publishTime));
}
const sockets = [];
let i = 0;
function connectSome() {
  for (let k = 0; k < 200 && i < clients; k++, i++) {
    const ws = new WebSocket(url, { perMessageDeflate: process.env.BENCH_OFFER_DEFLATE === "1" });
    ws.on("open", () => { open++; if (/permessage-deflate/.test(ws.extensions)) deflated++; });
    ws.on("message", onMessage);
    ws.on("error", () => { failed++; });
    ws.on("close", () => { closed++; });
    sockets.push(ws);
  }
  if (i < clients) setTimeout(connectSome, 20);
}
connectSome();
const started = Date.now();
function waitOpen() {
  if (open + failed >= clients || Date.now() - started > connectMs) {
    const connect_ms = Date.now() - started;
    console.error(`open ${open} failed ${failed} in ${connect_ms} ms`);
    process.stdout.write(JSON.stringify({ event: "connected", open, failed, deflated, connect_ms }) + "\n");
    setTimeout(() => {
      measuring = true;
      const t0 = Date.now();
      process.stdout.write(JSON.stringify({ event: "measuring" }) + "\n");
      setTimeout(() => {
        measuring = false;
        const secs = (Date.now() - t0) / 1000;
        lat.sort((a, b) => a - b);
        const q = (p) => (lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * lat.length))] : null);
        process.stdout.write(JSON.stringify({
          event: "result", clients, open, failed, closed, deflated, seconds: secs, delivered,
          per_second: delivered / secs, dropped, p50_ms: q(0.5), p99_ms: q(0.99), max_ms: lat.length ? lat[lat.length - 1] : null,
        }) + "\n");
        for (const ws of sockets) ws.terminate();
        setTimeout(() => process.exit(0), 200);
      }, measure * 1000);
    }, warmup * 1000);
  } else setTimeout(waitOpen, 50);
}
waitOpen();
