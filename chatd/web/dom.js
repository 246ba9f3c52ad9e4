// DOM helpers. Everything a peer sends reaches the page through text nodes
// (textContent, createTextNode) and never as markup: this file has no
// innerHTML, and neither may any other (docs/web-client.md, "Safe rendering").

/** The element with this id (throws if the page lacks it: a bug here). */
export function byId(id) {
  const found = document.getElementById(id);
  if (!found) throw new Error(`no element #${id}`);
  return found;
}

/**
 * A new element. `props`: "class", "text" (its text content), "dataset"
 * (an object), attributes by name (false/null/undefined are left out).
 * `children`: nodes or strings (strings become text nodes).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === false || value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

/** A name as isolated text: <bdi> keeps right-to-left names and stray
 * direction marks from reordering the text around them. */
export function name(text) {
  return el("bdi", { class: "name", text });
}

const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const full = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const day = new Intl.DateTimeFormat(undefined, { dateStyle: "medium" });

/** A <time> for `ms` (milliseconds since the epoch): the hour and minute,
 * with the date too when it is not today; the full date and time as a tooltip. */
export function time(ms) {
  const when = new Date(ms);
  const today = new Date().toDateString() === when.toDateString();
  const shown = today ? clock.format(when) : `${day.format(when)} ${clock.format(when)}`;
  return el("time", { datetime: when.toISOString(), title: full.format(when), text: shown });
}

/** Milliseconds for a peer's timestamp if it is a plausible number of
 * `unit` (1000 for seconds), else `fallback`. */
export function stamp(value, unit, fallback) {
  if (typeof value !== "number" || !Number.isFinite(value)) return fallback;
  const ms = value * unit;
  // Date can show 8.64e15 ms either side of 1970; beyond that is nonsense.
  return Math.abs(ms) <= 8.64e15 ? ms : fallback;
}

/** True when a scrollable list is (nearly) scrolled to its end. */
export function atBottom(list) {
  return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
}

/** Enter submits the form a <textarea> is in; Shift+Enter is a new line. */
export function enterSubmits(textarea) {
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      textarea.form.requestSubmit();
    }
  });
}

/**
 * Show a connection state in its status line (a live region): `text` is
 * announced when the state changes; `countdown` (e.g. "in 4 s") is shown
 * beside it but kept out of the announcement, which would otherwise repeat
 * every second. data-state carries the state for the style sheet.
 */
export function showState(node, state, text, countdown = "") {
  const same = node.dataset.state === state && node.dataset.text === text;
  if (!same) {
    node.dataset.state = state;
    node.dataset.text = text;
    node.replaceChildren(el("span", { class: "state-text", text }),
                         el("span", { class: "countdown", "aria-hidden": "true" }));
  }
  node.lastChild.textContent = countdown ? ` ${countdown}` : "";
}
