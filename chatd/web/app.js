// The page: two views, the lobby (wcp) and GradAgenda, chosen by the
// address's #fragment (#lobby, #gradagenda), so each can be bookmarked.
// Endpoint paths default to the embedded config's; a server that mounts
// them elsewhere is reached with ?wcp=/path&gradagenda=/path.

import { byId } from "./dom.js";
import { GradAgenda } from "./gradagenda.js";
import { Lobby } from "./lobby.js";

const VIEWS = ["lobby", "gradagenda"];

/** An endpoint path from the query string, if it is a plain path on this origin. */
function endpoint(key, fallback) {
  const value = new URLSearchParams(location.search).get(key);
  return value && /^\/[^\s?#]*$/.test(value) ? value : fallback;
}

function show(view) {
  for (const name of VIEWS) {
    const selected = name === view;
    byId(name).hidden = !selected;
    const tab = byId(`tab-${name}`);
    if (selected) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  document.title = `chatd: ${view === "lobby" ? "Lobby" : "GradAgenda"}`;
}

function route() {
  const view = location.hash.slice(1);
  show(VIEWS.includes(view) ? view : "lobby");
}

new Lobby(endpoint("wcp", "/wcp"));
new GradAgenda(endpoint("gradagenda", "/gradagenda"));
window.addEventListener("hashchange", route);
route();
