// A subscriber made with loopgate.js, for the Python tests that need one (not a test itself):
// prints one JSON line per message ({"messageId": ...}) and per status ({"status": ...}).
// usage: node subscriber.mjs BASE_URL TOPIC [websocket|sse]
import WebSocket from "ws";
import { subscribe } from "../../service/web/loopgate.js";

const [baseUrl, topic, transport = "websocket"] = process.argv.slice(2);
const print = (line) => process.stdout.write(JSON.stringify(line) + "\n");
subscribe(baseUrl, topic, {
  transport,
  WebSocket,
  initialDelayMs: 100,
  onMessage: (message) => print({ messageId: message.messageId }),
  onStatus: (status) => print({ status }),
});
process.on("SIGTERM", () => process.exit(0));
