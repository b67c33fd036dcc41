// sse-gateway from a browser: one native EventSource, no dependencies.
// connect(), scheduleRenewal() and fetchFreshToken() are what an application needs; the rest of
// this file only renders the page.
'use strict';

const $ = (id) => document.getElementById(id);
const MAX_LOG_ENTRIES = 200;
// Listened to by connect() itself, so never registered twice from the "Event types" field.
const BUILT_IN_TYPES = new Set(['message', 'open', 'error', 'ping', 'shutdown', 'reset', 'token_expired']);

let source = null; // the EventSource in use; null when disconnected
let renewTimer = null; // a pending reconnect with a fresh token
let renewals = 0; // consecutive token renewals, for the backoff
let lastEventId = ''; // the last id seen, to resume from in a new EventSource
let opens = 0;
let pings = 0;

// Settings may come in the query string, so that a link (or a test) opens a stream at once.
const params = new URLSearchParams(location.search);
$('gateway').value = params.get('gateway') ?? '';
$('token').value = params.get('token') ?? '';
if (params.has('events')) $('events').value = params.get('events');
if (params.has('token')) {
  // Take the token out of the address bar: it has no business in bookmarks or the history.
  params.delete('token');
  const rest = params.toString();
  history.replaceState(null, '', location.pathname + (rest ? `?${rest}` : ''));
}

function connect() {
  disconnect();
  const gateway = $('gateway').value.trim().replace(/\/+$/, '');
  const token = $('token').value.trim();
  // A native EventSource cannot send request headers, so the token travels in the query string.
  // Keep such tokens short-lived: URLs end up in proxy and server access logs.
  let url = `${gateway}/sse?access_token=${encodeURIComponent(token)}`;
  // A new EventSource starts with an empty lastEventId (only its own reconnects send one), so
  // pass the last id this page saw: the gateway replays what was published since.
  if (lastEventId) url += `&last_event_id=${encodeURIComponent(lastEventId)}`;
  const es = new EventSource(url);
  source = es;
  setState('connecting');

  es.addEventListener('open', () => {
    // The gateway names each stream in the X-Connection-Id response header (exposed through CORS),
    // but EventSource gives scripts no access to response headers. A fetch()-based client can read
    // it with response.headers.get('X-Connection-Id'); an EventSource page cannot.
    opens += 1;
    renewals = 0;
    $('opens').textContent = opens;
    setState('open');
    // Any open after the first is a reconnect, on which the browser sent the last id it saw as
    // Last-Event-ID: the gateway replays the events published since, or sends `reset`.
    notice(opens > 1 ? 'Reconnected: missed events are replayed.' : 'Connected.');
  });

  // Events without an `event:` line arrive as `message` (the same as es.onmessage).
  es.addEventListener('message', logEvent);
  // A named event reaches only the listeners registered for its exact name: EventSource has no
  // wildcard, so register every `type` your backend publishes.
  for (const type of eventTypes()) es.addEventListener(type, logEvent);

  // The gateway's keep-alive, every PING_INTERVAL. It carries no `id:`, so lastEventId is untouched.
  es.addEventListener('ping', () => {
    pings += 1;
    $('pings').textContent = pings;
  });

  es.addEventListener('shutdown', (event) => {
    // The gateway is stopping (a deploy, a scale-down). It ends the stream right after this event,
    // which also set the `retry:` delay; the browser then reconnects by itself, to another instance
    // or to this one once it is back. Do not close() here: that would cancel the reconnect.
    logEvent(event);
    notice('The gateway is restarting; the browser reconnects by itself.');
  });

  es.addEventListener('reset', (event) => {
    // The gateway cannot replay what this page missed (its history no longer reaches back that
    // far, or it does not know the id). Reload the data the page shows from your backend; the
    // stream goes on from the newest id, which this event carries.
    logEvent(event);
    notice('Missed events could not be replayed: reload your data.');
  });

  es.addEventListener('token_expired', (event) => {
    // The token ran out and the gateway ended the stream. The browser's own reconnect would reuse
    // the same URL, so the same token, and be refused: close and reopen with a fresh token.
    logEvent(event);
    es.close();
    setState('closed');
    scheduleRenewal();
  });

  es.addEventListener('error', () => {
    if (es.readyState === EventSource.CONNECTING) {
      // The stream ended or the network failed: the browser retries by itself after the `retry:`
      // delay the gateway sent. Nothing to do.
      setState('reconnecting');
      return;
    }
    // CLOSED: the gateway answered something other than a 200 event stream, and EventSource never
    // retries that (nor says which status it was). From the gateway that is a 401 (the token has
    // expired or is not valid) or, rarely, a 429 (this user has too many streams open). The only
    // way on is a new EventSource, with a fresh token, after a backoff.
    setState('closed');
    logLine('error', 'stream refused: most likely 401, the token has expired or is not valid');
    scheduleRenewal();
  });
}

function disconnect() {
  clearTimeout(renewTimer);
  renewTimer = null;
  if (source) {
    source.close(); // final: no more events and no reconnect
    source = null;
  }
  setState('idle');
}

// After a refusal: fetch a fresh token, then open a new EventSource. Back off, with jitter, so that
// a gateway that keeps refusing is not hammered and many tabs do not all come back at once.
function scheduleRenewal() {
  if (!params.has('token_url')) {
    notice('The token was refused or has expired. Paste a fresh one and press Connect.');
    return;
  }
  const delay = Math.min(30_000, 1000 * 2 ** renewals) * (0.5 + Math.random() / 2);
  renewals += 1;
  notice(`Fetching a fresh token in ${Math.round(delay / 1000)} s.`);
  renewTimer = setTimeout(async () => {
    renewTimer = null;
    try {
      $('token').value = await fetchFreshToken();
      connect();
    } catch (error) {
      logLine('error', `token renewal failed: ${error.message}`);
      scheduleRenewal();
    }
  }, delay);
}

// Tokens come from your own backend, which knows who is logged in and holds the signing secret
// (the browser never does). Here: the optional ?token_url=..., answering {"token": "<jwt>"}.
async function fetchFreshToken() {
  const response = await fetch(params.get('token_url'), { credentials: 'include' });
  if (!response.ok) throw new Error(`the token endpoint answered ${response.status}`);
  const { token } = await response.json();
  if (!token) throw new Error('the token endpoint sent no token');
  return token;
}

function logEvent(event) {
  // lastEventId is the last `id:` this stream carried, so an event without an id shows the one
  // before it. The browser sends it back as the Last-Event-ID header when it reconnects.
  if (event.lastEventId) lastEventId = event.lastEventId;
  $('last-id').textContent = lastEventId || 'none';
  logLine(event.type, event.data, event.lastEventId);
}

function logLine(type, text, id = '') {
  const li = document.createElement('li');
  li.dataset.type = type;
  li.dataset.lastEventId = id;
  const cells = [
    ['time', new Date().toLocaleTimeString()],
    ['type', type],
    ['id', id],
    ['data', text],
  ];
  for (const [name, value] of cells) {
    const span = document.createElement('span');
    span.className = name;
    // textContent, never innerHTML: event data comes from elsewhere and must not become markup.
    span.textContent = value;
    span.title = name === 'id' ? 'lastEventId' : '';
    li.append(span);
  }
  const log = $('log');
  log.append(li);
  while (log.children.length > MAX_LOG_ENTRIES) log.firstElementChild.remove();
}

function eventTypes() {
  const types = $('events').value.split(',').map((t) => t.trim());
  return [...new Set(types)].filter((t) => t && !BUILT_IN_TYPES.has(t));
}

function setState(state) {
  $('state').textContent = state;
  $('state').dataset.state = state;
  $('disconnect').disabled = state === 'idle';
}

function notice(text) {
  $('notice').textContent = text;
}

$('settings').addEventListener('submit', (event) => {
  event.preventDefault();
  renewals = 0;
  connect();
});
$('disconnect').addEventListener('click', () => {
  disconnect();
  notice('Disconnected.');
});

if ($('gateway').value && $('token').value) connect();
