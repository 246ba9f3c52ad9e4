#!/usr/bin/env node
// A minimal multichat server on the npm `ws` package, for comparison.
//
// It is the second yardstick chatd's fan-out is measured against
// (scripts/bench_peers.py), beside the Python `websockets` peer
// (scripts/peer_server.py), and behaves like it: the multichat protocol
// only (the protocol document's `register` / `register-ack` /
// `client-message` / `forwarding-message`), the way a careful small Node
// server would do it.
//
// - The first frame must be a `register` carrying a non-empty
//   `client-name` and the shared `secret-key` (compared in constant
//   time); anything else closes the connection with 1008.
// - After it, each `client-message` with a non-empty string `content`
//   goes to every other registered client as one `forwarding-message`:
//   the JSON is encoded once into a Buffer and `send()` writes it as a
//   text frame to each recipient; `ws` buffers in memory what a socket
//   cannot take at once (as `websockets.broadcast()` does). Other frames
//   are ignored, as multichat does after registration.
// - A frame over 4096 bytes closes the connection with 1009 (`maxPayload`),
//   like chatd's default `max-frame-bytes`. No compression is negotiated,
//   as chatd negotiates none, so every server writes the same bytes.
//
//     node scripts/peers/node_ws/server.js --port 8767 --secret-key s3cret
//
// It prints `listening on ws://HOST:PORT` on stderr once it accepts
// connections (`--port 0` picks a free port) and stops on SIGINT/SIGTERM,
// closing its clients with 1001. Install its one dependency first with
// `npm ci` in this directory (bench_peers.py and `loadtest.py --spawn
// node-ws` do it on first use).

'use strict';

const crypto = require('node:crypto');
const { parseArgs } = require('node:util');
const { WebSocket, WebSocketServer } = require('ws');

// Like chatd's default `max-frame-bytes`: larger frames close with 1009.
const MAX_FRAME_BYTES = 4096;

function parseAction(data, action) {
  // The frame if it is a JSON object whose `action` is `action`, else null.
  let frame;
  try {
    frame = JSON.parse(data.toString());
  } catch {
    return null;
  }
  if (frame === null || typeof frame !== 'object' || frame.action !== action) {
    return null;
  }
  return frame;
}

function parseRegister(data, secretKey) {
  // The client name of a valid `register` frame, else null.
  const frame = parseAction(data, 'register');
  if (frame === null) {
    return null;
  }
  const name = frame['client-name'];
  const secret = frame['secret-key'];
  if (typeof name !== 'string' || !name || typeof secret !== 'string') {
    return null;
  }
  const given = Buffer.from(secret);
  if (given.length !== secretKey.length || !crypto.timingSafeEqual(given, secretKey)) {
    return null;
  }
  return name;
}

function forwardingFrame(data, name) {
  // The `forwarding-message` for a `client-message` frame, else null.
  const frame = parseAction(data, 'client-message');
  if (frame === null) {
    return null;
  }
  const content = frame.content;
  if (typeof content !== 'string' || !content) {
    return null;
  }
  return Buffer.from(JSON.stringify({
    action: 'forwarding-message', 'source-client-name': name, content,
  }));
}

function serve(host, port, secretKey) {
  const registered = new Set();
  const wss = new WebSocketServer({
    host, port, backlog: 4096, maxPayload: MAX_FRAME_BYTES, perMessageDeflate: false,
  });

  wss.on('connection', (ws) => {
    let name = null;
    let refused = false;
    ws.on('message', (data) => {
      if (refused) {
        return;
      }
      if (name === null) {
        name = parseRegister(data, secretKey);
        if (name === null) {
          refused = true;
          ws.close(1008, 'first frame must be a valid register');
          return;
        }
        ws.send('{"action":"register-ack"}');
        registered.add(ws);
        return;
      }
      const out = forwardingFrame(data, name);
      if (out === null) {
        return;
      }
      for (const client of registered) {
        if (client !== ws && client.readyState === WebSocket.OPEN) {
          client.send(out, { binary: false });
        }
      }
    });
    ws.on('close', () => registered.delete(ws));
    ws.on('error', () => registered.delete(ws));
  });

  wss.on('listening', () => {
    const bound = wss.address();
    process.stderr.write(`listening on ws://${bound.address}:${bound.port}\n`);
  });
  wss.on('error', (err) => {
    process.stderr.write(`node-ws peer: ${err.message}\n`);
    process.exit(1);
  });

  const stop = () => {
    wss.close();
    for (const client of wss.clients) {
      client.close(1001, 'server shutting down');
    }
    // Clients that do not answer the close are not waited for long.
    setTimeout(() => process.exit(0), 1000).unref();
    wss.once('close', () => process.exit(0));
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}

function main() {
  const { values } = parseArgs({
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '8767' },
      'secret-key': { type: 'string' },
    },
  });
  const port = Number(values.port);
  if (!values['secret-key'] || !Number.isInteger(port) || port < 0 || port > 65535) {
    process.stderr.write('usage: server.js [--host HOST] [--port PORT] --secret-key KEY\n');
    process.exit(2);
  }
  serve(values.host, port, Buffer.from(values['secret-key']));
}

main();
