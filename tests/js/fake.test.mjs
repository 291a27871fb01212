// loopgate.js against a scripted fake loopgate (Node's http and the ws package): what a real
// server does only by chance or with difficulty, i.e. coalesced frames, duplicates, dropped
// notices, each close code, and handshake refusals with Retry-After.

import assert from "node:assert/strict";
import { createServer } from "node:http";
import { test } from "node:test";

import WebSocket, { WebSocketServer } from "ws";

import { Recorder, client, texts } from "./helpers.mjs";

const { subscribe, LoopgateError } = client;

/**
 * A fake loopgate: each connection attempt (websocket handshake or SSE request) is handed to
 * `handler(attempt)`, with `attempt.url`, `.headers`, `.at` (ms), `.refuse(status, headers,
 * body)`, and `.accept()` resolving to a channel { send(frame), close(code, reason) }.
 */
class FakeLoopgate {
  constructor(handler) {
    this.handler = handler;
    this.attempts = [];
    this.wss = new WebSocketServer({ noServer: true });
    this.server = createServer((request, response) => this.#sse(request, response));
    this.server.on("upgrade", (request, socket, head) => this.#upgrade(request, socket, head));
  }

  async start() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${this.server.address().port}`;
    return this;
  }

  async stop() {
    for (const socket of this.wss.clients) socket.terminate();
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  #attempt(request, extra) {
    const attempt = {
      url: new URL(request.url, "http://fake"),
      headers: request.headers,
      at: performance.now(),
      ...extra,
    };
    this.attempts.push(attempt);
    Promise.resolve(this.handler(attempt, this.attempts.length)).catch((error) => {
      console.error("fake server handler failed", error);
    });
  }

  #upgrade(request, socket, head) {
    this.#attempt(request, {
      refuse: (status, headers = {}, body = "") => {
        const lines = [`HTTP/1.1 ${status} Refused`, "Connection: close"];
        for (const [name, value] of Object.entries(headers)) lines.push(`${name}: ${value}`);
        lines.push(`Content-Length: ${Buffer.byteLength(body)}`);
        socket.end(`${lines.join("\r\n")}\r\n\r\n${body}`);
      },
      accept: () =>
        new Promise((resolve) => {
          this.wss.handleUpgrade(request, socket, head, (ws) =>
            resolve({
              send: (frame) => ws.send(JSON.stringify(frame)),
              close: (code, reason) => ws.close(code, reason),
            }),
          );
        }),
    });
  }

  #sse(request, response) {
    this.#attempt(request, {
      refuse: (status, headers = {}, body = "") => {
        response.writeHead(status, { "Content-Type": "application/json", ...headers });
        response.end(body);
      },
      accept: async () => {
        response.writeHead(200, { "Content-Type": "text/event-stream" });
        response.write(": hello\n\n");
        return {
          send: (frame) => {
            const id = frame.id ? `id: ${frame.id}\r\n` : "";
            // Split across writes and lines, as a network may: the parser must join them.
            const text = `${id}data: ${JSON.stringify(frame)}\r\n\r\n`;
            response.write(text.slice(0, 7));
            response.write(text.slice(7));
          },
          close: () => response.end(),
        };
      },
    });
  }
}

const subscribed = (id, fields = {}) => ({
  type: "subscribed",
  topic: "t",
  id,
  resumed: false,
  complete: true,
  ...fields,
});
const message = (n, id = `c${n}`) => ({
  type: "message",
  id,
  messageId: `m${n}`,
  data: Buffer.from(`text ${n}`).toString("base64"),
  attributes: { n: String(n) },
  orderingKey: "",
  publishTime: "2025-01-01T00:00:00.000001Z",
});

async function withFake(handler, run) {
  const fake = await new FakeLoopgate(handler).start();
  try {
    await run(fake);
  } finally {
    await fake.stop();
  }
}

function start(fake, transport, recorder, options = {}) {
  return subscribe(fake.url, "t", {
    token: "secret",
    transport,
    WebSocket,
    initialDelayMs: 20,
    maxDelayMs: 200,
    onMessage: recorder.onMessage,
    onStatus: recorder.onStatus,
    ...options,
  });
}

for (const transport of ["websocket", "sse"]) {
  test(`${transport}: coalesced frames, duplicates and dropped notices`, async () => {
    const frames = [
      subscribed("c0"),
      { type: "messages", messages: [message(1), message(2)] },
      message(2),
      { type: "dropped", count: 3 },
      { type: "messages", messages: [message(2), message(3)] },
    ];
    await withFake(
      async (attempt) => {
        const channel = await attempt.accept();
        for (const frame of frames) channel.send(frame);
      },
      async (fake) => {
        const recorder = new Recorder();
        const subscription = start(fake, transport, recorder);
        try {
          await recorder.messagesCount(3);
          assert.deepEqual(texts(recorder.messages), ["text 1", "text 2", "text 3"]);
          assert.deepEqual(recorder.messages[2].attributes, { n: "3" });
          const dropped = await recorder.status({ dropped: 3 });
          assert.equal(dropped.state, "open");
          assert.equal(subscription.lastEventId, "c3");
          const headers = fake.attempts[0].headers;
          assert.equal(headers.authorization, "Bearer secret");
          assert.equal(fake.attempts[0].url.searchParams.get("access_token"), null);
        } finally {
          subscription.close();
          await subscription.closed;
        }
      },
    );
  });

  test(`${transport}: the server going away: reconnect at once, resume, drop repeats`, async () => {
    await withFake(
      async (attempt, number) => {
        const channel = await attempt.accept();
        if (number === 1) {
          channel.send(subscribed("c0"));
          channel.send(message(1));
          channel.close(1001, "shutting down");
        } else {
          channel.send(subscribed("c1", { resumed: true }));
          channel.send(message(1)); // replayed near the cursor: a duplicate
          channel.send(message(2));
        }
      },
      async (fake) => {
        const recorder = new Recorder();
        const subscription = start(fake, transport, recorder, { initialDelayMs: 250 });
        try {
          await recorder.messagesCount(2);
          assert.deepEqual(texts(recorder.messages), ["text 1", "text 2"]);
          const reconnecting = await recorder.status({ state: "reconnecting" });
          assert.ok(reconnecting.delayMs <= 250, "a prompt reconnect, with a small jitter");
          if (transport === "websocket") {
            assert.equal(reconnecting.code, 1001);
            assert.equal(fake.attempts[1].url.searchParams.get("lastEventId"), "c1");
          } else {
            assert.equal(fake.attempts[1].headers["last-event-id"], "c1");
          }
          const opens = recorder.statuses.filter((status) => status.state === "open");
          assert.deepEqual(
            opens.map((status) => status.resumed),
            [false, true],
          );
        } finally {
          subscription.close();
          await subscription.closed;
        }
        assert.equal(fake.attempts.length, 2);
      },
    );
  });

  test(`${transport}: before any message, resume from the subscribed frame's id`, async () => {
    await withFake(
      async (attempt, number) => {
        const channel = await attempt.accept();
        channel.send(subscribed("s0", { resumed: number > 1 }));
        if (number === 1) channel.close(1000, "idle");
      },
      async (fake) => {
        const recorder = new Recorder();
        const subscription = start(fake, transport, recorder);
        try {
          await recorder.status({ state: "open", resumed: true });
          const second = fake.attempts[1];
          const cursor =
            transport === "websocket"
              ? second.url.searchParams.get("lastEventId")
              : second.headers["last-event-id"];
          assert.equal(cursor, "s0");
        } finally {
          subscription.close();
          await subscription.closed;
        }
      },
    );
  });

  for (const status of [429, 503]) {
    test(`${transport}: a ${status} refusal waits for its Retry-After`, async () => {
      await withFake(
        async (attempt, number) => {
          if (number === 1) {
            const body = JSON.stringify({ error: { code: status, message: "busy" } });
            attempt.refuse(status, { "Retry-After": "1" }, body);
            return;
          }
          const channel = await attempt.accept();
          channel.send(subscribed("c0"));
        },
        async (fake) => {
          const recorder = new Recorder();
          const subscription = start(fake, transport, recorder);
          try {
            await recorder.status({ state: "open" });
            const reconnecting = recorder.statuses.find((s) => s.state === "reconnecting");
            assert.equal(reconnecting.code, status);
            assert.equal(reconnecting.error.retryAfter, 1);
            assert.match(reconnecting.error.message, /busy/);
            assert.ok(reconnecting.delayMs >= 1000, `delayMs ${reconnecting.delayMs}`);
            const waited = fake.attempts[1].at - fake.attempts[0].at;
            assert.ok(waited >= 990, `the second attempt came after ${waited} ms`);
          } finally {
            subscription.close();
            await subscription.closed;
          }
        },
      );
    });
  }

  test(`${transport}: a 5xx refusal without Retry-After backs off and retries`, async () => {
    await withFake(
      async (attempt, number) => {
        if (number < 3) {
          attempt.refuse(502, {}, "bad gateway");
          return;
        }
        const channel = await attempt.accept();
        channel.send(subscribed("c0"));
      },
      async (fake) => {
        const recorder = new Recorder();
        const subscription = start(fake, transport, recorder);
        try {
          await recorder.status({ state: "open" });
          const waits = recorder.statuses.filter((s) => s.state === "reconnecting");
          assert.deepEqual(
            waits.map((s) => [s.code, s.attempt]),
            [
              [502, 2],
              [502, 3],
            ],
          );
          assert.ok(waits.every((s) => s.delayMs <= 200), "at most maxDelayMs");
        } finally {
          subscription.close();
          await subscription.closed;
        }
      },
    );
  });
}

test("websocket: 1008 stops, with the reason, and never reconnects", async () => {
  await withFake(
    async (attempt) => {
      const channel = await attempt.accept();
      channel.send(subscribed("c0"));
      channel.close(1008, "token expired");
    },
    async (fake) => {
      const recorder = new Recorder();
      const subscription = start(fake, "websocket", recorder);
      await subscription.closed;
      const closed = recorder.statuses.at(-1);
      assert.equal(closed.state, "closed");
      assert.equal(closed.code, 1008);
      assert.ok(closed.error instanceof LoopgateError);
      assert.match(closed.error.message, /token expired/);
      assert.equal(recorder.count("reconnecting"), 0);
      assert.equal(fake.attempts.length, 1);
    },
  );
});

test("websocket: 1013 backs off, then reconnects with the cursor", async () => {
  await withFake(
    async (attempt, number) => {
      const channel = await attempt.accept();
      channel.send(subscribed(`c${number}`, { resumed: number > 1 }));
      if (number < 3) channel.close(1013, "catch-up failed");
    },
    async (fake) => {
      const recorder = new Recorder();
      const subscription = start(fake, "websocket", recorder);
      try {
        await recorder.status({ state: "open", resumed: true, attempt: 3 });
        const waits = recorder.statuses.filter((s) => s.state === "reconnecting");
        assert.deepEqual(
          waits.map((s) => [s.code, s.reason, s.attempt]),
          [
            [1013, "catch-up failed", 2],
            [1013, "catch-up failed", 3],
          ],
        );
        assert.equal(fake.attempts[2].url.searchParams.get("lastEventId"), "c2");
      } finally {
        subscription.close();
        await subscription.closed;
      }
    },
  );
});

test("close() while connecting stops at once", async () => {
  await withFake(
    () => {}, // never answers
    async (fake) => {
      for (const transport of ["websocket", "sse"]) {
        const recorder = new Recorder();
        const subscription = start(fake, transport, recorder);
        await recorder.status({ state: "connecting" });
        subscription.close();
        await subscription.closed;
        assert.deepEqual(
          recorder.statuses.map((s) => s.state),
          ["connecting", "closed"],
        );
      }
    },
  );
});

test("the event stream parser joins lines and fields as the format says", () => {
  const events = [];
  const parser = new client.EventStreamParser((data) => events.push(data));
  parser.feed(": comment\n\ndata: one\r"); // \r, then \n in the next chunk: one line end
  parser.feed("\ndata:two\n\nid: 5\ndata");
  parser.feed(": x\ndata: y\r\rretry: 10\n\n");
  assert.deepEqual(events, ["one\ntwo", "x\ny"]);
});
