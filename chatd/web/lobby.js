// The lobby view, over wcp (README, "wcp"). The room's other clients may
// speak any of chatd's lobby protocols; on wcp they all arrive as
// {"type":"message","user_id","data","timestamp"} (seconds), and named
// clients' joins and leaves as user_joined / user_left.
//
// Joining: the draft defines no answer to an accepted user_joined, so the
// page sends a second, identical user_joined right behind the first. chatd
// handles a connection's frames in order, so the first error back settles
// the join: "already joined as NAME" means the first was accepted, any other
// error (e.g. "user_id already in use") means it was refused, with the
// server's reason. Right after an accepted join chatd sends one user_joined
// per member already in the room, which the roster is built from.

import { atBottom, byId, el, enterSubmits, name, showState, stamp, time } from "./dom.js";
import { describeClose, describeState, Link, socketUrl, wellFormed } from "./link.js";

const TAKEN = "user_id already in use";
const ACCEPTED = /^already joined as (.+)$/s;
/** Oldest entries are dropped beyond this many, so a long-open tab stays light. */
const KEEP = 1000;


export class Lobby {
  constructor(path) {
    this.path = path;
    this.link = null;
    /** The user_id this page joined (or is joining) with. */
    this.me = null;
    /** "out" (not joined), "joining" (user_joined sent), "in" (accepted). */
    this.phase = "out";
    /** True once this name was accepted: a later refusal is our own
     * dropped connection still holding it, so wait and retry. */
    this.accepted = false;
    /** user_id -> display_name of everyone in the room, us included. */
    this.roster = new Map();
    /** The last message sent, until the connection proves it was taken. */
    this.lastSent = null;

    this.stateLine = byId("lobby-state");
    this.retry = byId("lobby-retry");
    this.joinForm = byId("lobby-join");
    this.nameInput = byId("lobby-name");
    this.joinError = byId("lobby-join-error");
    this.room = byId("lobby-room");
    this.log = byId("lobby-log");
    this.scroller = byId("lobby-scroller");
    this.sendForm = byId("lobby-send");
    this.text = byId("lobby-text");
    this.rosterList = byId("lobby-roster");
    this.count = byId("lobby-count");

    this.joinForm.addEventListener("submit", (event) => {
      event.preventDefault();
      this.join(wellFormed(this.nameInput.value.trim()));
    });
    this.sendForm.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    enterSubmits(this.text);
    byId("lobby-leave").addEventListener("click", () => this.leave());
    this.retry.addEventListener("click", () => this.link && this.link.retryNow());
    this.setComposer(false);
  }

  /** Connect and join the room as `userId`. */
  join(userId) {
    if (!userId) return;
    this.joinError.textContent = "";
    this.me = userId;
    this.accepted = false;
    this.phase = "joining";
    this.joinForm.querySelector("button").disabled = true;
    this.link = new Link(socketUrl(this.path), this);
    this.link.start();
  }

  leave() {
    if (this.link) {
      this.link.send({ type: "user_left", user_id: this.me });
      this.link.stop(1000, "user left");
    }
    this.phase = "out";
    this.accepted = false;
    this.room.hidden = true;
    this.joinForm.hidden = false;
    this.joinForm.querySelector("button").disabled = false;
    this.nameInput.focus();
  }

  send() {
    // As Link.send sends it, so the page shows what the others get.
    const data = wellFormed(this.text.value);
    if (!data.trim() || this.phase !== "in") return;
    if (!this.link.send({ type: "message", data })) return;
    this.text.value = "";
    this.lastSent = { data, node: this.addMessage(this.me, data, Date.now(), { mine: true }) };
    this.text.focus();
  }

  // --- the connection --------------------------------------------------------

  onOpen() {
    this.phase = "joining";
    const join = { type: "user_joined", user_id: this.me, display_name: this.me };
    this.link.send(join);
    this.link.send(join); // the probe: see the top of this file
    this.roster = new Map([[this.me, this.me]]);
    this.renderRoster();
  }

  onFrame(frame) {
    switch (frame.type) {
      case "error":
        if (this.phase === "joining") {
          const accepted = ACCEPTED.exec(String(frame.message));
          if (accepted) this.onJoined(accepted[1]);
          else this.onRefused(String(frame.message));
        } else {
          this.addNotice(`The server said: ${frame.message}`, "error");
        }
        break;
      case "message":
        if (typeof frame.data === "string" && typeof frame.user_id === "string") {
          const when = stamp(frame.timestamp, 1000, Date.now());
          this.addMessage(frame.user_id, frame.data, when, { to: frame.to });
        }
        break;
      case "user_joined":
        if (typeof frame.user_id !== "string") break;
        if (this.phase === "in" && !this.roster.has(frame.user_id)) {
          this.addNotice(`${frame.user_id} joined`);
        }
        this.roster.set(frame.user_id, typeof frame.display_name === "string"
          ? frame.display_name : frame.user_id);
        this.renderRoster();
        break;
      case "user_left":
        if (typeof frame.user_id !== "string") break;
        if (this.roster.delete(frame.user_id)) this.addNotice(`${frame.user_id} left`);
        this.renderRoster();
        break;
      default:
        break;
    }
  }

  /** `bound`: the user_id the server bound, as it shows it to others. */
  onJoined(bound) {
    const first = !this.accepted;
    if (bound !== this.me) {
      this.roster.delete(this.me);
      this.me = bound;
      this.roster.set(bound, bound);
      this.renderRoster();
    }
    this.phase = "in";
    this.accepted = true;
    this.link.established();
    this.onState("joined");
    if (first) {
      this.log.replaceChildren();
      this.joinForm.hidden = true;
      this.room.hidden = false;
      this.addNotice(`You joined as ${this.me}.`);
      this.setComposer(true);
      this.text.focus();
    } else {
      this.addNotice("Reconnected. Messages sent while you were away are not shown.");
      this.setComposer(true);
    }
  }

  onRefused(reason) {
    if (this.accepted && reason === TAKEN) {
      // Our earlier connection may still hold the name until the server
      // notices it is gone: try again after the backoff.
      this.addNotice(`Your name is still held by your earlier connection; trying again.`);
      this.link.retryLater();
      return;
    }
    this.link.stop(1000, "refused");
    this.phase = "out";
    this.joinForm.hidden = false;
    this.room.hidden = true;
    this.joinForm.querySelector("button").disabled = false;
    this.joinError.textContent = `Cannot join as “${this.me}”: ${reason}`;
    this.nameInput.focus();
    this.nameInput.select();
  }

  onClose({ code, reason, final }) {
    if (this.phase === "out") return;
    const wasIn = this.phase === "in";
    this.phase = "joining";
    this.setComposer(false);
    const why = describeClose(code, reason);
    if (wasIn) this.addNotice(`Disconnected: ${why}.`, "error");
    if (code === 1009 && this.lastSent) {
      // The server closes a connection whose message is over its size
      // limit: say so on that message, and give its text back.
      const { data, node } = this.lastSent;
      node.classList.add("failed");
      node.querySelector(".meta").append(
        el("span", { class: "status", text: `not delivered: too long for this server (${reason || code})` }));
      if (!this.text.value) this.text.value = data;
    }
    this.lastSent = null;
    if (final) {
      this.phase = "out";
      this.room.hidden = true;
      this.joinForm.hidden = false;
      this.joinForm.querySelector("button").disabled = false;
      this.joinError.textContent = `The server closed the connection: ${why}`;
    }
  }

  onState(state, detail) {
    this.retry.hidden = !(state === "reconnecting" || state === "offline");
    const shared = describeState(state, detail);
    if (shared) showState(this.stateLine, ...shared);
    else if (state === "connected") showState(this.stateLine, "connecting", `Joining as ${this.me}…`);
    else if (state === "joined") showState(this.stateLine, "connected", `Connected as ${this.me}`);
    else showState(this.stateLine, "idle", "Not joined");
  }

  // --- rendering -------------------------------------------------------------

  setComposer(enabled) {
    this.text.disabled = !enabled;
    this.sendForm.querySelector("button").disabled = !enabled;
  }

  append(item) {
    const follow = atBottom(this.scroller) || item.classList.contains("mine");
    this.log.append(item);
    while (this.log.childElementCount > KEEP) this.log.firstElementChild.remove();
    if (follow) this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  addMessage(sender, text, ms, { mine = false, to } = {}) {
    const head = el("p", { class: "meta" }, name(sender),
      mine ? el("span", { class: "tag", text: "(you)" }) : null,
      typeof to === "string" ? el("span", { class: "tag", text: "(private, to you)" }) : null,
      time(ms));
    const body = el("p", { class: "body", dir: "auto", text });
    const item = el("li", { class: mine ? "msg mine" : "msg" }, head, body);
    this.append(item);
    return item;
  }

  addNotice(text, kind = "info") {
    this.append(el("li", { class: `notice ${kind}`, text }));
  }

  renderRoster() {
    const items = [...this.roster].sort(([a], [b]) => a.localeCompare(b)).map(([id, display]) =>
      el("li", {}, name(display),
        display !== id ? " " : null,
        display !== id ? el("span", { class: "tag" }, "(", name(id), ")") : null,
        id === this.me ? " " : null,
        id === this.me ? el("span", { class: "tag", text: "(you)" }) : null));
    this.rosterList.replaceChildren(...items);
    this.count.textContent = String(this.roster.size);
  }
}
