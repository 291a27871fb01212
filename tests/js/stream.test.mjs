// loopgate.js against a real loopgate: messages over websocket and SSE, publish(), refusals.

import assert from "node:assert/strict";
import { test } from "node:test";

import WebSocket from "ws";

import { BASE_URL, Recorder, TOKEN, UNSCOPED_TOKEN, client, newTopic, texts } from "./helpers.mjs";

const { publish, subscribe, LoopgateError } = client;

for (const transport of ["websocket", "sse"]) {
  test(`${transport}: each message arrives once, as one object`, async () => {
    const topic = await newTopic();
    const recorder = new Recorder();
    const subscription = subscribe(BASE_URL, topic, {
      token: TOKEN,
      transport,
      WebSocket,
      onMessage: recorder.onMessage,
      onStatus: recorder.onStatus,
    });
    try {
      const open = await recorder.status({ state: "open" });
      assert.equal(open.resumed, false);
      assert.equal(open.complete, true);
      assert.ok(subscription.lastEventId, "the subscribed frame's id is the first cursor");
      const ids = await publish(
        BASE_URL,
        topic,
        [
          { data: "héllo", attributes: { kind: "greeting" } },
          { data: new Uint8Array([0, 1, 2, 255]) },
        ],
        { token: TOKEN },
      );
      assert.equal(ids.length, 2);
      await recorder.messagesCount(2);
      const [first, second] = recorder.messages;
      assert.deepEqual(
        recorder.messages.map((message) => message.messageId),
        ids,
      );
      assert.equal(first.text, "héllo");
      assert.equal(first.data, Buffer.from("héllo").toString("base64"));
      assert.deepEqual(first.attributes, { kind: "greeting" });
      assert.equal(typeof first.id, "string");
      assert.ok(first.publishTime);
      assert.equal(first.orderingKey, "");
      assert.deepEqual([...second.bytes()], [0, 1, 2, 255]);
      assert.equal(subscription.lastEventId, second.id);
    } finally {
      subscription.close();
      await subscription.closed;
    }
    assert.equal(recorder.statuses.at(-1).state, "closed");
    assert.equal(recorder.statuses.at(-1).error, null);
  });

  test(`${transport}: a burst arrives whole and in order, whatever its frames`, async () => {
    const topic = await newTopic();
    const recorder = new Recorder();
    const subscription = subscribe(BASE_URL, topic, {
      token: TOKEN,
      transport,
      WebSocket,
      onMessage: recorder.onMessage,
      onStatus: recorder.onStatus,
    });
    try {
      await recorder.status({ state: "open" });
      const sent = Array.from({ length: 200 }, (_, i) => ({ data: `m${i}` }));
      await publish(BASE_URL, topic, sent, { token: TOKEN });
      await recorder.messagesCount(200);
      assert.deepEqual(
        texts(recorder.messages),
        sent.map((message) => message.data),
      );
    } finally {
      subscription.close();
      await subscription.closed;
    }
  });

  test(`${transport}: a token without the scope stops the subscription`, async () => {
    const topic = await newTopic();
    const recorder = new Recorder();
    const subscription = subscribe(BASE_URL, topic, {
      token: UNSCOPED_TOKEN,
      transport,
      WebSocket,
      onStatus: recorder.onStatus,
    });
    await subscription.closed;
    const closed = recorder.statuses.at(-1);
    assert.equal(closed.state, "closed");
    assert.ok(closed.error instanceof LoopgateError);
    assert.equal(closed.error.status, 403);
    assert.match(closed.error.message, /lacks the scope/);
    assert.equal(recorder.count("connecting"), 1, "a refusal is not retried");
  });

  test(`${transport}: a bad token stops the subscription with 401`, async () => {
    const recorder = new Recorder();
    const subscription = subscribe(BASE_URL, await newTopic(), {
      token: "not-a-token",
      transport,
      WebSocket,
      onStatus: recorder.onStatus,
    });
    await subscription.closed;
    assert.equal(recorder.statuses.at(-1).error.status, 401);
    assert.equal(recorder.count("connecting"), 1);
  });

  test(`${transport}: a refused cursor is dropped once, and the gap reported`, async () => {
    const topic = await newTopic();
    const recorder = new Recorder();
    const subscription = subscribe(BASE_URL, topic, {
      token: TOKEN,
      transport,
      WebSocket,
      lastEventId: "not-a-cursor",
      initialDelayMs: 10,
      onMessage: recorder.onMessage,
      onStatus: recorder.onStatus,
    });
    try {
      const open = await recorder.status({ state: "open" });
      assert.equal(open.complete, false);
      assert.equal(open.error.status, 400);
      const reconnecting = recorder.statuses.find((status) => status.state === "reconnecting");
      assert.equal(reconnecting.code, 400);
      assert.notEqual(subscription.lastEventId, "not-a-cursor");
      await publish(BASE_URL, topic, [{ data: "after" }], { token: TOKEN });
      await recorder.messagesCount(1);
      assert.deepEqual(texts(recorder.messages), ["after"]);
    } finally {
      subscription.close();
      await subscription.closed;
    }
  });

  test(`${transport}: a topic that does not exist stops with 404`, async () => {
    const recorder = new Recorder();
    const subscription = subscribe(BASE_URL, `js-missing-${Date.now()}`, {
      token: TOKEN,
      transport,
      WebSocket,
      onStatus: recorder.onStatus,
    });
    await subscription.closed;
    assert.equal(recorder.statuses.at(-1).error.status, 404);
  });
}

test("publish() rejects with the server's error", async () => {
  const topic = await newTopic();
  await assert.rejects(
    publish(BASE_URL, topic, [{ data: "x" }], { token: UNSCOPED_TOKEN }),
    (error) =>
      error instanceof LoopgateError &&
      error.status === 403 &&
      error.code === "PERMISSION_DENIED" &&
      /lacks the scope/.test(error.message),
  );
  await assert.rejects(
    publish(BASE_URL, topic, [], { token: TOKEN }), // no message: a 400
    (error) => error instanceof LoopgateError && error.status === 400,
  );
});

test("publish() keeps ordering keys and takes ArrayBuffers", async () => {
  const topic = await newTopic();
  const recorder = new Recorder();
  const subscription = subscribe(BASE_URL, topic, {
    token: () => Promise.resolve(TOKEN), // a token function, called per connection
    WebSocket,
    onMessage: recorder.onMessage,
    onStatus: recorder.onStatus,
  });
  try {
    await recorder.status({ state: "open" });
    await publish(
      BASE_URL,
      topic,
      [{ data: new TextEncoder().encode("keyed").buffer, orderingKey: "k1" }],
      { token: TOKEN },
    );
    await recorder.messagesCount(1);
    assert.equal(recorder.messages[0].text, "keyed");
    assert.equal(recorder.messages[0].orderingKey, "k1");
  } finally {
    subscription.close();
    await subscription.closed;
  }
});
