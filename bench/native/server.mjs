// The native fan-out baseline (bench/native.py): the same job as bench/rawserver.py,
// in Node.js with the `ws` library instead of Python. The first message of a
// connection is its join, answered with the ack given on the command line (hex); every
// later message goes to every other member of the one channel, unparsed.
//
// usage: node server.mjs PORT ACK_HEX
import { WebSocketServer } from "ws";

const port = Number(process.argv[2]);
const ack = Buffer.from(process.argv[3], "hex");
const members = new Set();
const wss = new WebSocketServer({
  host: "127.0.0.1", port, perMessageDeflate: false, maxPayload: 64 * 1024,
});

wss.on("connection", (ws) => {
  let joined = false;
  ws.on("message", (data) => {
    if (!joined) {
      joined = true;
      members.add(ws);
      ws.send(ack, { binary: true });
      return;
    }
    for (const other of members) {
      if (other !== ws) other.send(data, { binary: true });
    }
  });
  ws.on("close", () => members.delete(ws));
  ws.on("error", () => members.delete(ws));
});
wss.on("listening", () => console.log(`native ws server on ${port}`));
process.on("SIGTERM", () => process.exit(0));
