// A WebSocket that comes back: after the server restarts (close 1012, or
// 1001 from an older chatd) or the network drops (1006), it reconnects by
// itself with capped exponential backoff and jitter, and waits for the
// browser to be online again before trying. The view that owns it decides
// when a connection counts as established (joined, authenticated): only then
// does the backoff start again from the shortest delay, so a server that
// accepts and at once refuses is not hammered.

/** Delays: the n-th retry waits a random time between half and all of
 * min(CAP, BASE * 2^n) milliseconds ("equal jitter"), so clients that lost
 * the same server do not all come back in the same instant. */
export const BASE_MS = 1000;
export const CAP_MS = 30000;

export function backoff(attempt, random = Math.random) {
  const ceiling = Math.min(CAP_MS, BASE_MS * 2 ** Math.min(attempt, 16));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** The WebSocket URL of `path` on the page's own origin (the Content-Security-
 * Policy allows no other). */
export function socketUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

const CLOSED = {
  1001: "the server shut down",
  1002: "the server could not read what this page sent",
  1003: "the server could not read what this page sent",
  1006: "the connection dropped",
  1007: "the server could not read what this page sent",
  1011: "the server hit an internal error",
  1012: "the server is restarting",
};

/** Closes for a frame the server would not take (RFC 6455 section 7.4.1:
 * a protocol error, data it cannot accept, text that is not what it says,
 * a message too big): not a refused sign-in. */
export const BAD_FRAME = new Set([1002, 1003, 1007, 1009]);

// Half of a UTF-16 surrogate pair with no other half (a cut paste, half an emoji).
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

/** `text` with each lone surrogate replaced by U+FFFD, as the WHATWG
 * encoding standard does for text it sends (USVString). JSON.stringify
 * would write one as a `\uD83D` escape, which is no Unicode text: chatd
 * refuses it (GradAgenda closes 1007, RFC 8259 section 8.2). */
export function wellFormed(text) {
  return typeof text.toWellFormed === "function" ? text.toWellFormed()
    : text.replace(LONE_SURROGATE, "\uFFFD");
}

function sendable(key, value) {
  return typeof value === "string" ? wellFormed(value) : value;
}

/** Why a socket closed, in words (`reason`: the close frame's). */
export function describeClose(code, reason) {
  if (code === 1006 && reason) return reason;
  return CLOSED[code] || `closed (${code}${reason ? `: ${reason}` : ""})`;
}

/** The status line for the states every view shares: [data-state, text,
 * countdown], or null for a state the view words itself. */
export function describeState(state, detail) {
  switch (state) {
    case "connecting":
      return ["connecting", "Connecting…", ""];
    case "reconnecting":
      return ["reconnecting", "Reconnecting", `in ${detail} s`];
    case "offline":
      return ["offline", "Offline: waiting for the network", ""];
    default:
      return null;
  }
}

/** Close codes after which trying again cannot help (RFC 6455 section 7.4.1;
 * 1008 is chatd's "policy": a refused sign-in or a client cut off for
 * flooding). 1000 is handled by the view (wcp ends a session with it). */
const FINAL = new Set([1002, 1003, 1007, 1008, 1010]);

/**
 * One reconnecting WebSocket.
 *
 * `handlers` (the view that owns it): onOpen() when a socket opens; onFrame(object) for each JSON
 * frame (frames that are not JSON are skipped); onState(state, detail) with
 * state one of "connecting", "connected", "reconnecting" (detail: seconds
 * left), "offline", "stopped" (detail: {code, reason} of the last close);
 * onClose({code, reason, final}) when a socket closes (final: no retry,
 * unless onClose returns "retry").
 */
export class Link {
  constructor(url, handlers) {
    this.url = url;
    this.handlers = handlers;
    this.socket = null;
    this.attempt = 0;
    this.timer = null;
    this.ticker = null;
    this.running = false;
    this.onOnline = () => { if (this.running && !this.socket) this.retryNow(); };
    // The browser lost its network: the socket is as good as dead (it could
    // hang on unanswered until TCP gives up), so let it go and wait.
    this.onOffline = () => { if (this.running) this.dropOffline(); };
  }

  /** Start connecting (again). */
  start() {
    this.running = true;
    this.attempt = 0;
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOffline);
    this.open();
  }

  /** Close for good: no reconnection. */
  stop(code = 1000, reason = "") {
    this.running = false;
    this.clearTimers();
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOffline);
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      if (socket.readyState <= WebSocket.OPEN) socket.close(code, reason);
    }
    this.handlers.onState("stopped", { code, reason });
  }

  /** The connection did what it is for: the next drop retries quickly. */
  established() {
    this.attempt = 0;
  }

  /** Close this socket and reconnect after the backoff (e.g. a name still
   * held by our own dropped connection). */
  retryLater() {
    const socket = this.socket;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      socket.close(1000, "retrying");
      this.socket = null;
    }
    this.schedule();
  }

  /** Skip the wait and reconnect now. */
  retryNow() {
    if (!this.running) return;
    this.clearTimers();
    if (!this.socket) this.open();
  }

  /** Send one JSON frame, every string in it well-formed (`wellFormed`):
   * false when no socket is open. */
  send(frame) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return false;
    this.socket.send(JSON.stringify(frame, sendable));
    return true;
  }

  /** True while a socket is open. */
  get isOpen() {
    return Boolean(this.socket && this.socket.readyState === WebSocket.OPEN);
  }

  // --- internals -----------------------------------------------------------

  open() {
    if (!navigator.onLine) {
      this.waitOnline();
      return;
    }
    this.clearTimers();
    this.handlers.onState("connecting");
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.onopen = () => {
      this.handlers.onState("connected");
      this.handlers.onOpen();
    };
    socket.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame && typeof frame === "object" && !Array.isArray(frame)) this.handlers.onFrame(frame);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      const final = FINAL.has(event.code);
      const verdict = this.handlers.onClose({ code: event.code, reason: event.reason, final });
      if (!this.running) return;
      if (final && verdict !== "retry") this.stop(event.code, event.reason);
      else this.schedule();
    };
  }

  schedule() {
    if (!this.running) return;
    if (!navigator.onLine) {
      this.waitOnline();
      return;
    }
    const delay = backoff(this.attempt);
    this.attempt += 1;
    const due = Date.now() + delay;
    const tell = () => {
      const left = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      this.handlers.onState("reconnecting", left);
    };
    this.clearTimers();
    tell();
    this.ticker = setInterval(tell, 1000);
    this.timer = setTimeout(() => this.open(), delay);
  }

  dropOffline() {
    const socket = this.socket;
    if (socket) {
      this.socket = null;
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      socket.close(1000, "offline");
      this.handlers.onClose({ code: 1006, reason: "the network is offline", final: false });
    }
    this.waitOnline();
  }

  waitOnline() {
    this.clearTimers();
    this.handlers.onState("offline");
  }

  clearTimers() {
    clearTimeout(this.timer);
    clearInterval(this.ticker);
    this.timer = this.ticker = null;
  }
}
