// A Node.js client of sse-gateway built on the npm `eventsource` package (v4), for tests/node_client.rs
// and as an example for backend developers.
//
// Usage: SSE_TOKEN=<jwt> node client.mjs <gateway-url> [event-type] [count]
//
// Unlike a browser's EventSource, this one can send the token in an `Authorization: Bearer` header,
// which keeps it out of URLs and access logs. Prints one JSON line on stdout per milestone:
//   {"kind":"open"}                                            the stream is open
//   {"kind":"event","type":..,"lastEventId":..,"data":..}      each of `count` events of `event-type`
// then exits 0. `data` is the event's JSON data, parsed. A refused stream (401: bad or expired token)
// is final: it prints {"kind":"closed","code":401,"message":..} and exits 1. Gives up after
// CLIENT_LIMIT_MS (default 20 s) with exit status 2.
import { EventSource } from 'eventsource';

const [base, wanted = 'message', countArg = '1'] = process.argv.slice(2);
const token = process.env.SSE_TOKEN;
if (!base || !token) {
  console.error('usage: SSE_TOKEN=<jwt> node client.mjs <gateway-url> [event-type] [count]');
  process.exit(64);
}
const count = Number(countArg);
const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);

const es = new EventSource(new URL('/sse', base), {
  // v4 has no `headers` option (v2 had one): it takes a fetch implementation instead, and every
  // request goes through it, reconnects included. A long-running client would read its current
  // token here rather than a constant, so that a reconnect uses a fresh one.
  fetch: (input, init) =>
    fetch(input, { ...init, headers: { ...init.headers, Authorization: `Bearer ${token}` } }),
});

const limit = setTimeout(() => {
  console.error(`no ${count} "${wanted}" event(s) within the time limit`);
  finish(2);
}, Number(process.env.CLIENT_LIMIT_MS || 20_000));

function finish(code) {
  clearTimeout(limit);
  es.close();
  // Nothing is left to keep the event loop alive: Node exits once stdout is flushed.
  process.exitCode = code;
}

es.addEventListener('open', () => print({ kind: 'open' }));

let seen = 0;
es.addEventListener(wanted, (event) => {
  let data;
  try {
    data = JSON.parse(event.data);
  } catch {
    data = event.data; // not JSON: a raw payload
  }
  print({ kind: 'event', type: event.type, lastEventId: event.lastEventId, data });
  seen += 1;
  if (seen >= count) finish(0);
});

es.addEventListener('error', (event) => {
  if (es.readyState === EventSource.CLOSED) {
    // A non-200 answer: EventSource does not retry it. `code` is the HTTP status (an extension of
    // this package; browsers do not expose it).
    print({ kind: 'closed', code: event.code ?? null, message: event.message ?? null });
    finish(1);
  } else {
    // The stream ended or the network failed: the package reconnects by itself after `retry:`.
    console.error(`reconnecting: ${event.message ?? 'stream ended'}`);
  }
});
