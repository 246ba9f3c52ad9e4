// The GradAgenda view (README, "GradAgenda"): sign in with a user id and a
// token, list and create sessions, read a session's history a page at a
// time, send. Every request carries a fresh cdid and its answer is matched
// by it; frames without a cdid are changes made elsewhere (another member,
// or this user's other devices) and are shown as they come.
//
// Nothing is lost across a reconnection: once signed in again, the page
// asks for the open session's history after the last seq it has (page by
// page while pages come back full), and only then sends the messages still
// waiting, each after checking that the server has not already stored it.

import { atBottom, byId, el, enterSubmits, name, showState, time } from "./dom.js";
import { BAD_FRAME, describeClose, describeState, Link, socketUrl, wellFormed } from "./link.js";

/** Messages asked for per history page (chatd caps a page at 100). */
export const PAGE = 50;
const CATCH_UP_PAGE = 100;
const SAVED = "chatd.gradagenda";


/** A random hex string of `bytes` bytes (works outside secure contexts too). */
function randomHex(bytes) {
  return [...crypto.getRandomValues(new Uint8Array(bytes))]
    .map((b) => b.toString(16).padStart(2, "0")).join("");
}

class Closed extends Error {}

export class GradAgenda {
  constructor(path) {
    this.path = path;
    this.link = null;
    this.user = null;
    this.device = null;
    this.token = null;
    /** Signed in on the current connection. */
    this.authed = false;
    /** Signed in at least once with these credentials. */
    this.signedIn = false;
    /** Bumped on every new connection: work begun on an older one stops. */
    this.generation = 0;
    this.cdidPrefix = randomHex(4);
    this.cdidCount = 0;
    /** cdid -> {resolve, reject, items}: requests waiting for their answer. */
    this.pending = new Map();
    /** session-id -> {id, kind, members, peer, unread, active}. */
    this.sessions = new Map();
    /** The open session: {id, seqs, first, last, start, ready, loading}. */
    this.open = null;
    /** Messages not yet confirmed, in the order written: {cdid, sessionId,
     * body, ts, state ("waiting" | "sending" | "failed"), node}. */
    this.outbox = [];

    this.stateLine = byId("ga-state");
    this.retry = byId("ga-retry");
    this.form = byId("ga-signin");
    this.formError = byId("ga-signin-error");
    this.app = byId("ga-app");
    this.list = byId("ga-sessions");
    this.empty = byId("ga-sessions-empty");
    this.title = byId("ga-session-title");
    this.members = byId("ga-session-members");
    this.scroller = byId("ga-scroller");
    this.log = byId("ga-log");
    this.pager = byId("ga-pager");
    this.earlier = byId("ga-earlier");
    this.startNote = byId("ga-start");
    this.sendForm = byId("ga-send");
    this.text = byId("ga-text");

    this.roles = byId("ga-session-roles");
    this.marksLine = byId("ga-session-marks");
    this.manageBox = byId("ga-manage-box");
    this.leave = byId("ga-leave");
    this.file = byId("ga-file");
    this.readMarks = byId("ga-read-marks");
    /** session-id -> {delivered, read}: marks of this device not yet sent. */
    this.toMark = new Map();
    this.markTimer = null;
    /** media-id -> Promise of an object URL (fetched once per page). */
    this.mediaUrls = new Map();

    const device = byId("ga-device");
    device.value = localStorage.getItem("chatd.device") || `browser-${randomHex(3)}`;

    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      localStorage.setItem("chatd.device", device.value.trim());
      this.signIn(wellFormed(byId("ga-user").value.trim()), wellFormed(byId("ga-token").value.trim()),
                  wellFormed(device.value.trim()));
    });
    byId("ga-signout").addEventListener("click", () => this.signOut());
    this.retry.addEventListener("click", () => this.link && this.link.retryNow());
    byId("ga-new-group").addEventListener("submit", (event) => {
      event.preventDefault();
      this.createGroup();
    });
    byId("ga-new-direct").addEventListener("submit", (event) => {
      event.preventDefault();
      this.openDirect();
    });
    this.sendForm.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    enterSubmits(this.text);
    byId("ga-back").addEventListener("click", () => {
      this.app.classList.remove("reading");
      const current = this.list.querySelector("[aria-current]");
      (current || this.list.querySelector("button") || byId("ga-signout")).focus();
    });
    this.earlier.addEventListener("click", () => this.loadEarlier());
    byId("ga-manage").addEventListener("submit", (event) => {
      event.preventDefault();
      this.saveMembers();
    });
    byId("ga-delete").addEventListener("click", () => this.deleteGroup());
    this.leave.addEventListener("click", () => this.leaveGroup());
    this.file.addEventListener("change", () => this.attach());
    this.readMarks.checked = localStorage.getItem("chatd.read-marks") !== "off";
    this.readMarks.addEventListener("change", () => this.setReadMarks());
    document.addEventListener("visibilitychange", () => {
      if (this.open && this.open.last !== null) this.markSoon(this.open.id, this.open.last, true);
    });
    // Scrolling up to the top of a session loads the page before it.
    this.observer = new IntersectionObserver((entries) => {
      if (entries.some((entry) => entry.isIntersecting)) this.loadEarlier();
    }, { root: this.scroller });
    this.observer.observe(this.pager);

    const saved = sessionStorage.getItem(SAVED);
    if (saved) {
      try {
        const { user, token, device: dev } = JSON.parse(saved);
        byId("ga-user").value = user;
        device.value = dev;
        this.signIn(user, token, dev);
      } catch {
        sessionStorage.removeItem(SAVED);
      }
    }
  }

  // --- signing in and out -----------------------------------------------------

  signIn(user, token, device) {
    if (!user || !token || !device) return;
    if (this.link) this.link.stop();
    if (user !== this.user) this.reset();
    this.user = user;
    this.token = token;
    this.device = device;
    this.formError.textContent = "";
    this.form.querySelector("button").disabled = true;
    this.link = new Link(socketUrl(this.path), this);
    this.link.start();
  }

  signOut() {
    if (this.link) this.link.stop();
    this.link = null;
    sessionStorage.removeItem(SAVED);
    this.reset();
    this.user = this.token = null;
    this.app.hidden = true;
    this.form.hidden = false;
    this.form.querySelector("button").disabled = false;
    byId("ga-token").value = "";
    byId("ga-user").focus();
  }

  reset() {
    this.signedIn = false;
    this.sessions.clear();
    this.outbox = [];
    this.closeSession();
    this.renderSessions();
  }

  refused(reason) {
    this.link.stop(1000, "refused");
    this.app.hidden = true;
    this.form.hidden = false;
    this.form.querySelector("button").disabled = false;
    this.formError.textContent = this.signedIn
      ? `Please sign in again: the server refused your token (${reason}).`
      : `Cannot sign in: ${reason}`;
    sessionStorage.removeItem(SAVED);
    this.signedIn = false;
    byId("ga-token").focus();
  }

  // --- the connection --------------------------------------------------------

  async onOpen() {
    const generation = ++this.generation;
    this.authed = false;
    try {
      await this.request({ type: "authenticate", "user-id": this.user,
                           "device-id": this.device, token: this.token });
    } catch (error) {
      if (!(error instanceof Closed)) this.refused(error.message);
      return;
    }
    this.authed = true;
    this.link.established();
    if (!this.readMarks.checked) this.setReadMarks();
    this.onState("authenticated");
    if (!this.signedIn) {
      this.signedIn = true;
      sessionStorage.setItem(SAVED, JSON.stringify(
        { user: this.user, token: this.token, device: this.device }));
      byId("ga-me").textContent = this.user;
      this.form.hidden = true;
      this.app.hidden = false;
      this.form.querySelector("button").disabled = false;
      byId("ga-token").value = "";
      this.title.focus();
    } else if (this.open) {
      this.addNotice("Reconnected.");
    }
    try {
      await this.loadSessions();
      if (generation !== this.generation) return;
      if (this.open && this.open.ready) await this.catchUp(this.open);
      if (generation !== this.generation) return;
      await this.flushOutbox(generation);
    } catch (error) {
      if (!(error instanceof Closed)) this.addNotice(`Could not load: ${error.message}`, "error");
    }
  }

  onClose({ code, reason, final }) {
    const wasAuthed = this.authed;
    this.authed = false;
    this.generation += 1;
    for (const waiting of this.pending.values()) waiting.reject(new Closed("connection closed"));
    this.pending.clear();
    const why = describeClose(code, reason);
    for (const item of this.outbox) {
      if (item.state !== "sending") continue;
      // 1009: the server would not take a message that long; 1007 and the
      // like: one it could not read. Sending it again would only close the
      // next connection too.
      if (code === 1009) this.markOutbox(item, "failed", `too long for this server (${reason || code})`);
      else if (BAD_FRAME.has(code)) this.markOutbox(item, "failed", `${why} (${code}${reason ? `: ${reason}` : ""})`);
      else this.markOutbox(item, "waiting");
    }
    if (wasAuthed && this.open) this.addNotice(`Disconnected: ${why}.`, "error");
    // A refused token is a failed answer to authenticate (onOpen), or the
    // close (1008) that ends a sign-in that never succeeded. A close for a
    // frame the server would not take, or one after signing in (a client
    // cut off as a slow consumer), keeps the sign-in and reconnects.
    if (!final) return undefined;
    if (code === 1008 && !wasAuthed) {
      this.refused(why);
      return undefined;
    }
    return "retry";
  }

  onState(state, detail) {
    this.retry.hidden = !(state === "reconnecting" || state === "offline");
    const shared = describeState(state, detail);
    if (shared) showState(this.stateLine, ...shared);
    else if (state === "connected") showState(this.stateLine, "connecting", `Signing in as ${this.user}…`);
    else if (state === "authenticated") showState(this.stateLine, "connected", `Connected as ${this.user} (${this.device})`);
    else showState(this.stateLine, "idle", "Signed out");
  }

  /** Send an action with a new cdid; resolves with its answer (the frame,
   * or the actions of a batched answer), rejects with the server's reason. */
  request(action, cdid = this.newCdid()) {
    return new Promise((resolve, reject) => {
      this.pending.set(cdid, { resolve, reject, items: [] });
      if (!this.link || !this.link.send({ ...action, cdid })) {
        this.pending.delete(cdid);
        reject(new Closed("not connected"));
      }
    });
  }

  newCdid() {
    this.cdidCount += 1;
    return `${this.cdidPrefix}-${this.cdidCount}`;
  }

  onFrame(frame) {
    const cdid = frame.cdid;
    const waiting = cdid === undefined ? undefined : this.pending.get(cdid);
    switch (frame.type) {
      case "batch-mode-action":
        if (!Array.isArray(frame.actions)) break;
        if (waiting) waiting.items.push(...frame.actions);
        else for (const action of frame.actions) this.onFrame(action);
        break;
      case "status-response":
        if (waiting) {
          this.pending.delete(cdid);
          if (frame.status === "succeeded") waiting.resolve(waiting.items);
          else waiting.reject(new Error(String(frame.message || "refused")));
        } else if (frame.status === "failed") {
          this.addNotice(`The server said: ${frame.message}`, "error");
        }
        break;
      case "providing-session-info":
        this.onSessionInfo(frame);
        if (waiting) {
          this.pending.delete(cdid);
          waiting.resolve(frame);
        }
        break;
      case "providing-marks":
        this.onMarks(frame);
        break;
      case "message-broadcast":
        this.onBroadcast(frame);
        if (waiting) {
          this.pending.delete(cdid);
          waiting.resolve(frame);
        }
        break;
      default:
        break;
    }
  }

  // --- sessions ------------------------------------------------------------

  directPeers() {
    try {
      return JSON.parse(localStorage.getItem(`chatd.direct:${this.user}`)) || {};
    } catch {
      return {};
    }
  }

  rememberDirect(id, peer) {
    const peers = this.directPeers();
    if (peers[id] === peer) return;
    peers[id] = peer;
    localStorage.setItem(`chatd.direct:${this.user}`, JSON.stringify(peers));
  }

  async loadSessions() {
    const items = await this.request({ type: "request-mutable-session-listing" });
    const listed = new Set();
    for (const info of items) {
      if (info && info.type === "providing-session-info") {
        listed.add(info["session-id"]);
        this.onSessionInfo(info);
      } else if (info && info.type === "providing-marks") {
        this.onMarks(info);
      }
    }
    // Groups this user left or lost while away.
    for (const [id, session] of this.sessions) {
      if (session.kind === "mutable" && !listed.has(id)) this.dropSession(id, "removed");
    }
    for (const [id, peer] of Object.entries(this.directPeers())) {
      if (!this.sessions.has(id)) {
        this.sessions.set(id, { id, kind: "direct", members: [this.user, peer], peer,
                                unread: 0, active: 0 });
      }
    }
    this.renderSessions();
  }

  onSessionInfo(info) {
    const id = info["session-id"];
    const members = Array.isArray(info["user-id"]) ? info["user-id"].map(String) : [];
    if (typeof id !== "string") return;
    if (info.status === "deleted") {
      this.dropSession(id, "deleted");
      return;
    }
    if (!members.includes(this.user)) {
      this.dropSession(id, "removed");
      return;
    }
    const kind = info["session-type"] === "direct" ? "direct" : "mutable";
    const known = this.sessions.get(id);
    const session = known || { id, kind, unread: 0, active: 0 };
    session.members = members;
    session.owners = Array.isArray(info["owner-id"]) ? info["owner-id"].map(String) : [];
    session.admins = Array.isArray(info["admin-id"]) ? info["admin-id"].map(String) : [];
    if (!session.marks) session.marks = new Map();
    if (kind === "direct") {
      session.peer = members.find((m) => m !== this.user) || this.user;
      this.rememberDirect(id, session.peer);
    }
    this.sessions.set(id, session);
    if (this.open && this.open.id === id) this.showHead(session);
    this.renderSessions();
  }

  dropSession(id, why) {
    if (!this.sessions.delete(id)) return;
    if (this.open && this.open.id === id) {
      this.addNotice(why === "deleted" ? "This session was deleted." : "You are no longer a member of this session.", "error");
      this.open = null;
      this.setComposer(false);
    }
    this.renderSessions();
  }

  async createGroup() {
    const input = byId("ga-members");
    const error = byId("ga-new-group-error");
    const members = input.value.split(/[\s,]+/).filter(Boolean);
    error.textContent = "";
    try {
      const info = await this.request({ type: "request-mutable-session-creation",
                                        "user-id": members });
      input.value = "";
      await this.openSession(info["session-id"]);
    } catch (err) {
      error.textContent = `Could not create the group: ${err.message}`;
    }
  }

  async openDirect() {
    const input = byId("ga-peer");
    const error = byId("ga-new-direct-error");
    error.textContent = "";
    try {
      const info = await this.request({ type: "request-direct-session-info",
                                        "user-id": input.value.trim() });
      input.value = "";
      await this.openSession(info["session-id"]);
    } catch (err) {
      error.textContent = `Could not open the chat: ${err.message}`;
    }
  }

  // --- one session's messages ------------------------------------------------

  closeSession() {
    this.open = null;
    this.log.replaceChildren();
    this.pager.hidden = true;
    this.title.textContent = "No session open";
    this.members.textContent = "";
    this.roles.textContent = "";
    this.marksLine.textContent = "";
    this.manageBox.hidden = true;
    this.leave.hidden = true;
    this.setComposer(false);
  }

  async openSession(id) {
    const session = this.sessions.get(id);
    if (!session) return;
    const open = { id, seqs: new Set(), first: null, last: null, start: false,
                   ready: false, loading: true };
    this.open = open;
    session.unread = 0;
    this.renderSessions();
    this.log.replaceChildren();
    this.showHead(session);
    this.pager.hidden = true;
    this.app.classList.add("reading");
    this.setComposer(true);
    for (const item of this.outbox) {
      if (item.sessionId === id) this.log.append(item.node);
    }
    this.text.focus();
    try {
      const page = await this.request({ type: "request-message-history", "session-id": id,
                                        limit: PAGE });
      if (this.open !== open) return;
      this.insert(page);
      open.start = page.length < PAGE;
    } catch (err) {
      if (this.open === open) this.addNotice(`Could not load the history: ${err.message}`, "error");
    }
    if (this.open !== open) return;
    open.ready = true;
    open.loading = false;
    this.showPager();
    this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  showHead(session) {
    this.title.textContent = this.sessionTitle(session);
    const others = session.members.filter((m) => m !== this.user);
    this.members.textContent = session.kind === "direct"
      ? "Direct chat"
      : `Group members: ${[this.user + " (you)", ...others].join(", ")}`;
    const group = session.kind === "mutable";
    const owners = session.owners || [];
    const admins = session.admins || [];
    this.roles.textContent = group
      ? `Owner: ${owners.join(", ") || "none"}${admins.length ? ` · Admins: ${admins.join(", ")}` : ""}`
      : "";
    const manager = group && (owners.includes(this.user) || admins.includes(this.user));
    this.manageBox.hidden = !manager;
    this.leave.hidden = !group;
    if (manager) {
      byId("ga-manage-members").value = session.members.join(", ");
      byId("ga-manage-admins").value = admins.join(", ");
      byId("ga-manage-admins").disabled = !owners.includes(this.user);
    }
    this.showMarks(session);
  }

  // --- roles (owner, admins, members) -------------------------------------------

  async modifyGroup(members, admins) {
    const action = { type: "request-mutable-session-modification", "session-id": this.open.id,
                     "user-id": members };
    if (admins !== undefined) action["admin-id"] = admins;
    return this.request(action);
  }

  async saveMembers() {
    const session = this.open && this.sessions.get(this.open.id);
    if (!session) return;
    const error = byId("ga-manage-error");
    error.textContent = "";
    const split = (id) => byId(id).value.split(/[\s,]+/).filter(Boolean);
    const members = split("ga-manage-members");
    const ownerOnly = byId("ga-manage-admins").disabled;
    try {
      await this.modifyGroup(members, ownerOnly ? undefined : split("ga-manage-admins"));
    } catch (err) {
      error.textContent = `Could not change the group: ${err.message}`;
    }
  }

  async leaveGroup() {
    const session = this.open && this.sessions.get(this.open.id);
    if (!session) return;
    try {
      await this.modifyGroup(session.members.filter((m) => m !== this.user));
    } catch (err) {
      this.addNotice(`Could not leave: ${err.message}`, "error");
    }
  }

  async deleteGroup() {
    if (!this.open) return;
    try {
      await this.request({ type: "request-mutable-session-deletion", "session-id": this.open.id });
    } catch (err) {
      byId("ga-manage-error").textContent = `Could not delete the group: ${err.message}`;
    }
  }

  // --- delivery and read marks ------------------------------------------------------

  onMarks(frame) {
    const session = this.sessions.get(frame["session-id"]);
    if (!session || !Array.isArray(frame.marks)) return;
    if (!session.marks) session.marks = new Map();
    for (const mark of frame.marks) {
      if (!mark || typeof mark["user-id"] !== "string") continue;
      const known = session.marks.get(mark["user-id"]) || { delivered: 0, read: null };
      session.marks.set(mark["user-id"], {
        delivered: Math.max(known.delivered, Number(mark["delivered-seq"]) || 0),
        read: Number.isInteger(mark["read-seq"]) ? Math.max(known.read || 0, mark["read-seq"]) : null,
      });
    }
    if (this.open && this.open.id === session.id) this.showMarks(session);
  }

  showMarks(session) {
    const parts = [];
    for (const member of session.members || []) {
      if (member === this.user) continue;
      const mark = session.marks && session.marks.get(member);
      if (!mark || !mark.delivered) continue;
      parts.push(mark.read !== null && mark.read > 0
        ? `${member} has read up to #${mark.read}`
        : `${member} has received up to #${mark.delivered}`);
    }
    this.marksLine.textContent = parts.join(" · ");
  }

  /** Report (at most every 300 ms) that this device got a session's messages
   * up to `seq`, and that they were read if `read` and the page is visible. */
  markSoon(id, seq, read) {
    const known = this.toMark.get(id) || { delivered: 0, read: 0 };
    known.delivered = Math.max(known.delivered, seq);
    if (read && document.visibilityState === "visible" && this.readMarks.checked) {
      known.read = Math.max(known.read, seq);
    }
    this.toMark.set(id, known);
    if (this.markTimer === null) this.markTimer = setTimeout(() => this.sendMarks(), 300);
  }

  sendMarks() {
    this.markTimer = null;
    if (!this.authed) return;
    const marks = [...this.toMark];
    this.toMark.clear();
    for (const [id, mark] of marks) {
      const action = { type: "request-marking-messages", "session-id": id,
                       "delivered-seq": mark.delivered };
      if (mark.read) action["read-seq"] = mark.read;
      this.request(action).catch(() => {});
    }
  }

  setReadMarks() {
    const enabled = this.readMarks.checked;
    localStorage.setItem("chatd.read-marks", enabled ? "on" : "off");
    if (this.authed) {
      this.request({ type: "request-read-marks-setting", enabled }).catch((err) => {
        this.addNotice(`Could not change the read-marks setting: ${err.message}`, "error");
      });
    }
  }

  showPager() {
    const open = this.open;
    this.pager.hidden = !open;
    if (!open) return;
    this.earlier.hidden = open.start;
    this.startNote.hidden = !open.start;
  }

  /** The page before the oldest message shown (when scrolled to the top). */
  async loadEarlier() {
    const open = this.open;
    if (!open || !open.ready || open.loading || open.start || !this.authed) return;
    open.loading = true;
    this.earlier.disabled = true;
    try {
      const before = open.first === null ? undefined : open.first;
      const page = await this.request({ type: "request-message-history", "session-id": open.id,
                                        before, limit: PAGE });
      if (this.open !== open) return;
      const fromBottom = this.scroller.scrollHeight - this.scroller.scrollTop;
      this.insert(page);
      this.scroller.scrollTop = this.scroller.scrollHeight - fromBottom;
      open.start = page.length < PAGE;
    } catch (err) {
      if (this.open === open && !(err instanceof Closed)) {
        this.addNotice(`Could not load earlier messages: ${err.message}`, "error");
      }
    } finally {
      open.loading = false;
      this.earlier.disabled = false;
      if (this.open === open) this.showPager();
    }
    // Still at the top (a short page): keep going until the view is full.
    if (this.open === open && !open.start && this.scroller.scrollTop < this.pager.offsetHeight) {
      this.loadEarlier();
    }
  }

  /** After a reconnection: what the open session got while we were away. */
  async catchUp(open) {
    let after = open.last ?? 0;
    for (;;) {
      const page = await this.request({ type: "request-message-history", "session-id": open.id,
                                        after, limit: CATCH_UP_PAGE });
      if (this.open !== open) return;
      this.insert(page);
      if (page.length < CATCH_UP_PAGE) return;
      after = open.last;
    }
  }

  onBroadcast(message) {
    const id = message["session-id"];
    if (typeof id !== "string") return;
    const mine = this.outbox.find((item) => item.cdid !== undefined && item.cdid === message.cdid);
    if (mine) this.dropOutbox(mine);
    let session = this.sessions.get(id);
    if (!session) {
      // A direct session someone else opened, or a group made while we were
      // away: show it now, and learn its members from a fresh listing.
      const sender = String(message["sender-id"]);
      const direct = id.startsWith("direct-");
      session = { id, kind: direct ? "direct" : "mutable", members: [this.user], unread: 0,
                  active: 0 };
      if (direct && sender !== this.user) {
        session.peer = sender;
        session.members = [this.user, sender];
        this.rememberDirect(id, sender);
      }
      this.sessions.set(id, session);
      if (!direct) this.loadSessions().catch(() => {});
    }
    session.active = Math.max(session.active, Number(message["server-timestamp"]) || 0);
    if (this.open && this.open.id === id) {
      const follow = atBottom(this.scroller) || mine;
      this.insert([message]);
      if (follow) this.scroller.scrollTop = this.scroller.scrollHeight;
    } else {
      session.unread += 1;
      if (Number.isInteger(message.seq)) this.markSoon(id, message.seq, false);
    }
    this.renderSessions();
  }

  /** Show history or broadcast messages of the open session in seq order,
   * each once, before the messages still waiting to be sent. */
  insert(messages) {
    const open = this.open;
    for (const message of messages) {
      if (!message || message.type !== "message-broadcast" || message["session-id"] !== open.id) continue;
      const seq = message.seq;
      if (!Number.isInteger(seq) || open.seqs.has(seq)) continue;
      open.seqs.add(seq);
      open.first = open.first === null ? seq : Math.min(open.first, seq);
      open.last = open.last === null ? seq : Math.max(open.last, seq);
      this.settleOutbox(message);
      const node = this.renderMessage(message);
      let next = null;
      for (const item of this.log.children) {
        const other = item.dataset.seq === undefined ? Infinity : Number(item.dataset.seq);
        if (other > seq && !item.classList.contains("notice")) {
          next = item;
          break;
        }
      }
      this.log.insertBefore(node, next);
    }
    if (open.last !== null) this.markSoon(open.id, open.last, true);
  }

  renderMessage(message) {
    const sender = String(message["sender-id"]);
    const content = message.message;
    const media = content && (content.type === "image" || content.type === "voice")
      && typeof content["media-id"] === "string";
    const text = content && (content.type === "text" || media) && typeof content.body === "string"
      ? content.body : "(a message of a kind this page cannot show)";
    const ms = Number(message["server-timestamp"]) || Date.now();
    const mine = sender === this.user;
    return el("li", { class: mine ? "msg mine" : "msg", dataset: { seq: String(message.seq) } },
      el("p", { class: "meta" }, name(sender),
         mine ? el("span", { class: "tag", text: "(you)" }) : null, time(ms)),
      media ? this.renderMedia(content) : null,
      text || !media ? el("p", { class: "body", dir: "auto", text }) : null);
  }

  // --- images and voice clips (fetched with the token, shown from blob: URLs) ----

  renderMedia(content) {
    const id = content["media-id"];
    const box = el("p", { class: "media", dataset: { media: id } });
    let url = this.mediaUrls.get(id);
    if (!url) {
      url = fetch(`/media/${encodeURIComponent(id)}`, {
        headers: { Authorization: `Bearer ${this.token}` } })
        .then((answer) => {
          if (!answer.ok) throw new Error(`${answer.status}`);
          return answer.blob();
        })
        .then((blob) => URL.createObjectURL(blob));
      this.mediaUrls.set(id, url);
    }
    url.then((src) => {
      if (content.type === "image") {
        box.append(el("img", { src, alt: content.body || "an image",
                               width: Math.min(Number(content.width) || 320, 320) }));
      } else {
        box.append(el("audio", { src, controls: true, preload: "metadata" }));
      }
    }).catch((err) => {
      this.mediaUrls.delete(id);
      box.append(el("span", { class: "error", text: `(could not load the ${content.type}: ${err.message})` }));
    });
    return box;
  }

  async attach() {
    const file = this.file.files && this.file.files[0];
    this.file.value = "";
    if (!file || !this.open) return;
    const sessionId = this.open.id;
    try {
      const answer = await fetch(`/media?session-id=${encodeURIComponent(sessionId)}`, {
        method: "POST", body: file, headers: { Authorization: `Bearer ${this.token}` } });
      const result = await answer.json();
      if (!answer.ok) throw new Error(result.error || answer.status);
      const message = { type: result.kind, body: file.name, "media-id": result["media-id"] };
      if (result.kind === "image") {
        const size = await imageSize(file);
        message.width = size.width;
        message.height = size.height;
      } else {
        message.duration = await clipDuration(file);
      }
      await this.request({ type: "request-sending-a-message", "session-id": sessionId, message,
                           "sender-timestamp": Date.now() });
    } catch (err) {
      if (!(err instanceof Closed)) this.addNotice(`Could not send the file: ${err.message}`, "error");
    }
  }

  addNotice(text, kind = "info") {
    const follow = atBottom(this.scroller);
    this.log.append(el("li", { class: `notice ${kind}`, text }));
    if (follow) this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  // --- sending ---------------------------------------------------------------

  setComposer(enabled) {
    this.text.disabled = !enabled;
    this.file.disabled = !enabled;
    this.sendForm.querySelector("button").disabled = !enabled;
  }

  send() {
    // As it will be sent and stored (Link.send): so it matches its stored copy.
    const body = wellFormed(this.text.value);
    if (!body.trim() || !this.open) return;
    const item = { sessionId: this.open.id, body, ts: Date.now(), state: "waiting",
                   cdid: undefined, node: null };
    item.status = el("span", { class: "status" });
    item.retry = el("button", { type: "button", class: "secondary retry", text: "Retry", hidden: true });
    item.retry.addEventListener("click", () => this.sendOne(item, this.generation));
    item.node = el("li", { class: "msg mine pending" },
      el("p", { class: "meta" }, name(this.user), el("span", { class: "tag", text: "(you)" }),
         item.status, item.retry),
      el("p", { class: "body", dir: "auto", text: body }));
    this.outbox.push(item);
    this.log.append(item.node);
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.text.value = "";
    this.markOutbox(item, "waiting");
    if (this.authed) this.sendOne(item, this.generation);
  }

  async sendOne(item, generation) {
    if (generation !== this.generation || !this.authed) return;
    this.markOutbox(item, "sending");
    item.cdid = this.newCdid();
    try {
      await this.request({ type: "request-sending-a-message", "session-id": item.sessionId,
                           message: { type: "text", body: item.body },
                           "sender-timestamp": item.ts }, item.cdid);
    } catch (err) {
      // A lost connection is onClose's to handle (it knows the close code).
      if (!(err instanceof Closed)) this.markOutbox(item, "failed", err.message);
    }
  }

  /** After signing in again: send what is waiting, unless the server stored
   * it before the connection dropped (then history shows it). */
  async flushOutbox(generation) {
    const waiting = this.outbox.filter((item) => item.state === "waiting");
    const sessions = new Set(waiting.map((item) => item.sessionId));
    for (const id of sessions) {
      if (this.open && this.open.id === id) continue; // catchUp has looked
      const page = await this.request({ type: "request-message-history", "session-id": id,
                                        limit: CATCH_UP_PAGE });
      for (const message of page) this.settleOutbox(message);
    }
    for (const item of waiting) {
      if (this.outbox.includes(item)) this.sendOne(item, generation);
    }
  }

  /** A stored message that is one of ours still waiting: it got through. */
  settleOutbox(message) {
    if (message["sender-id"] !== this.user) return;
    const item = this.outbox.find((it) => it.sessionId === message["session-id"]
      && it.ts === message["sender-timestamp"]
      && message.message && it.body === message.message.body);
    if (item) this.dropOutbox(item);
  }

  dropOutbox(item) {
    this.outbox.splice(this.outbox.indexOf(item), 1);
    item.node.remove();
  }

  markOutbox(item, state, reason = "") {
    item.state = state;
    item.status.textContent = {
      waiting: "waiting for the connection",
      sending: "sending…",
      failed: `not sent: ${reason}`,
    }[state];
    item.retry.hidden = state !== "failed";
    item.node.dataset.state = state;
  }

  // --- the session list ------------------------------------------------------

  sessionTitle(session) {
    if (session.kind === "direct") return `Direct: ${session.peer || "(unknown)"}`;
    const others = session.members.filter((m) => m !== this.user);
    return others.length ? `Group: ${others.join(", ")}` : "Group: just you";
  }

  renderSessions() {
    const sessions = [...this.sessions.values()].sort((a, b) => (b.active - a.active)
      || this.sessionTitle(a).localeCompare(this.sessionTitle(b)));
    this.list.replaceChildren(...sessions.map((session) => {
      const button = el("button", { type: "button", class: "session",
                                    "aria-current": this.open && this.open.id === session.id ? "true" : null },
        el("span", { class: "session-title", text: this.sessionTitle(session) }),
        session.unread ? el("span", { class: "unread", text: `${session.unread} new` }) : null);
      button.addEventListener("click", () => this.openSession(session.id));
      return el("li", {}, button);
    }));
    this.empty.hidden = sessions.length > 0;
  }
}


/** An image's size in pixels (1 x 1 if the browser cannot decode it). */
async function imageSize(file) {
  try {
    const bitmap = await createImageBitmap(file);
    const size = { width: Math.max(1, Math.min(bitmap.width, 65535)),
                   height: Math.max(1, Math.min(bitmap.height, 65535)) };
    bitmap.close();
    return size;
  } catch {
    return { width: 1, height: 1 };
  }
}

/** A clip's duration in ms, as the browser reads it (1 ms if it cannot). */
function clipDuration(file) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(file);
    const audio = new Audio();
    const done = (ms) => {
      URL.revokeObjectURL(url);
      resolve(Math.max(1, Math.min(Math.round(ms) || 1, 3600000)));
    };
    audio.addEventListener("loadedmetadata", () => done(Number.isFinite(audio.duration) ? audio.duration * 1000 : 1));
    audio.addEventListener("error", () => done(1));
    setTimeout(() => done(1), 2000);
    audio.src = url;
  });
}
