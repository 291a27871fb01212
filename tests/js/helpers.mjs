// Shared by the Node tests of loopgate.js: the environment tests/test_js_client.py sets, the
// control server's calls, and waiting for a client's messages and statuses.

import { pathToFileURL } from "node:url";

export const BASE_URL = required("JS_TEST_BASE_URL");
export const CONTROL_URL = required("JS_TEST_CONTROL_URL");
export const TOKEN = required("JS_TEST_TOKEN");
export const UNSCOPED_TOKEN = required("JS_TEST_UNSCOPED_TOKEN");
export const WAIT_MS = Number(process.env.JS_TEST_WAIT_MS || 30000);

/** The client module under test. */
export const client = await import(pathToFileURL(required("JS_TEST_CLIENT")).href);

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests with tests/test_js_client.py`);
  return value;
}

async function control(path, body = {}) {
  const response = await fetch(`${CONTROL_URL}${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`control ${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

/** A new topic (retaining its messages) that the test token may use. */
export async function newTopic() {
  return (await control("/topics")).name;
}

/** Publish straight to Pub/Sub, not through loopgate (which may be down). */
export async function publishToPubSub(topic, text, attributes = {}) {
  const data = Buffer.from(text).toString("base64");
  return (await control("/publish", { topic, data, attributes })).messageId;
}

export const stopServer = () => control("/stop");
export const startServer = () => control("/start");

/**
 * A recorder of a subscription's messages and statuses, with waits that fail after WAIT_MS.
 */
export class Recorder {
  constructor() {
    this.messages = [];
    this.statuses = [];
    this.waiters = new Set();
    this.onMessage = (message) => {
      this.messages.push(message);
      this.#wake();
    };
    this.onStatus = (status) => {
      this.statuses.push(status);
      this.#wake();
    };
  }

  #wake() {
    for (const waiter of [...this.waiters]) waiter();
  }

  /** Resolves once predicate() is true; rejects after WAIT_MS with `what`. */
  until(predicate, what) {
    return new Promise((resolve, reject) => {
      const check = () => {
        let value;
        try {
          value = predicate();
        } catch (error) {
          done();
          reject(error);
          return;
        }
        if (value) {
          done();
          resolve(value);
        }
      };
      const timer = setTimeout(() => {
        done();
        const statuses = this.statuses.map((status) => JSON.stringify(status)).join("\n");
        reject(new Error(`timed out waiting for ${what}; statuses:\n${statuses}`));
      }, WAIT_MS);
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      this.waiters.add(check);
      check();
    });
  }

  /** The first status (from index `from`) matching `fields`. */
  status(fields, from = 0) {
    const matches = (status) =>
      Object.entries(fields).every(([key, value]) => status[key] === value);
    return this.until(
      () => this.statuses.slice(from).find(matches),
      `a status like ${JSON.stringify(fields)}`,
    );
  }

  /** The number of times status `state` was reported. */
  count(state) {
    return this.statuses.filter((status) => status.state === state).length;
  }

  messagesCount(count) {
    return this.until(() => this.messages.length >= count, `${count} messages`);
  }
}

export function texts(messages) {
  return messages.map((message) => message.text);
}
