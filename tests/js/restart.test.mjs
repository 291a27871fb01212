// loopgate.js across a real server restart: the client reconnects by itself, resumes from its
// cursor, and gets what was published while the server was down, once.

import assert from "node:assert/strict";
import { test } from "node:test";

import WebSocket from "ws";

import {
  BASE_URL,
  Recorder,
  TOKEN,
  client,
  newTopic,
  publishToPubSub,
  startServer,
  stopServer,
  texts,
} from "./helpers.mjs";

const { publish, subscribe } = client;

for (const transport of ["websocket", "sse"]) {
  test(`${transport}: a restart of the server loses nothing`, async () => {
    const topic = await newTopic();
    const recorder = new Recorder();
    const subscription = subscribe(BASE_URL, topic, {
      token: TOKEN,
      transport,
      WebSocket,
      maxDelayMs: 500,
      onMessage: recorder.onMessage,
      onStatus: recorder.onStatus,
    });
    try {
      await recorder.status({ state: "open" });
      await publish(BASE_URL, topic, [{ data: "before" }], { token: TOKEN });
      await recorder.messagesCount(1);
      const cursor = subscription.lastEventId;
      assert.equal(cursor, recorder.messages[0].id);

      const stopping = recorder.statuses.length;
      await stopServer();
      const reconnecting = await recorder.status({ state: "reconnecting" }, stopping);
      if (transport === "websocket") assert.equal(reconnecting.code, 1001);
      const down = await publishToPubSub(topic, "while down");
      await startServer();

      const resumed = await recorder.status({ state: "open", resumed: true }, stopping);
      assert.equal(resumed.complete, true);
      await publish(BASE_URL, topic, [{ data: "after" }], { token: TOKEN });
      await recorder.messagesCount(3);
      assert.deepEqual(texts(recorder.messages), ["before", "while down", "after"]);
      assert.equal(recorder.messages[1].messageId, down);
    } finally {
      subscription.close();
      await subscription.closed;
    }
  });
}
