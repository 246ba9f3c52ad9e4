// The chatd admin page: the server API (docs/api.md) from a browser.
// No build step, no inline script (the page's CSP allows only this origin),
// and every value from the server is shown as text, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "chatd-admin-key";
let room = "lobby";
let timer = null;

function say(text, error = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", error);
}

async function call(method, body = {}) {
  const response = await fetch(`/api/${method}`, {
    method: "POST",
    headers: {"Authorization": `Bearer ${sessionStorage.getItem(KEY) || ""}`,
              "Content-Type": "application/json"},
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) {
    const error = new Error(answer.error || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return answer;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  row.append(td);
  return td;
}

function button(parent, label, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", () => act(action));
  parent.append(b);
  return b;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) : "";
}

async function act(action) {
  try {
    const message = await action();
    say(message || "done");
  } catch (error) {
    say(error.message, true);
  }
  await refresh();
}

async function refresh() {
  try {
    const [info, presence, bans, mutes, activity] = await Promise.all([
      call("info"), call("presence", {room}), call("bans"), call("mutes"), call("activity")]);
    showInfo(info);
    showPresence(presence);
    showRules([...bans.bans, ...mutes.mutes]);
    showActivity(activity.actions);
  } catch (error) {
    if (error.status === 401 || error.status === 429) {
      signOut(error.message);
    } else {
      say(error.message, true);
    }
  }
}

function showInfo(info) {
  $("node").textContent = `node ${info.node} · ${info.connections.total} connections · store ${info.store.state} · broker ${info.broker.kind} ${info.broker.state}`;
  const rooms = $("rooms");
  rooms.replaceChildren();
  for (const [name, count] of Object.entries(info.rooms)) {
    const li = document.createElement("li");
    button(li, `${name} (${count})`, async () => { room = name; $("room").value = name; return ""; });
    rooms.append(li);
  }
}

function showPresence(presence) {
  $("presence-title").textContent = `Who is in ${presence.room}`;
  const body = $("presence").tBodies[0];
  body.replaceChildren();
  for (const client of presence.clients) {
    const row = body.insertRow();
    row.dataset.name = client.name || "";
    cell(row, client.name || "(listening)");
    cell(row, client.protocol);
    cell(row, client.node);
    cell(row, client.address);
    cell(row, when(client.since));
    const actions = cell(row, "");
    const address = client.address ? client.address.replace(/^\[?([^\]]*?)\]?(:\d+)?$/, "$1") : null;
    if (client.name) {
      button(actions, "Disconnect", async () => {
        const answer = await call("disconnect", {name: client.name});
        return `disconnected ${answer.disconnected}`;
      });
      button(actions, "Ban", async () => {
        await call("ban", {name: client.name, reason: "banned from the admin page"});
        return `banned ${client.name}`;
      });
      button(actions, "Mute", async () => {
        await call("mute", {name: client.name, room: presence.room});
        return `muted ${client.name} in ${presence.room}`;
      });
    } else if (address) {
      button(actions, "Disconnect", async () => {
        const answer = await call("disconnect", {address});
        return `disconnected ${answer.disconnected}`;
      });
    }
  }
}

function showRules(rules) {
  const body = $("rules").tBodies[0];
  body.replaceChildren();
  for (const rule of rules) {
    const row = body.insertRow();
    const target = rule.name !== undefined ? "name" : rule.user !== undefined ? "user" : "address";
    row.dataset.id = rule.id;
    cell(row, rule.action);
    cell(row, `${target} ${rule[target]}`);
    cell(row, rule.action === "mute" ? (rule.room || "every room") : "");
    cell(row, rule.reason);
    cell(row, rule.expires ? when(rule.expires) : "until lifted");
    button(cell(row, ""), rule.action === "ban" ? "Unban" : "Unmute", async () => {
      await call(rule.action === "ban" ? "unban" : "unmute", {id: rule.id});
      return `lifted the ${rule.action} of ${rule[target]}`;
    });
  }
}

function showActivity(actions) {
  const list = $("activity");
  list.replaceChildren();
  for (const entry of actions) {
    const li = document.createElement("li");
    li.textContent = `${when(entry.time)} ${entry.action}`;
    list.append(li);
  }
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  $("console").hidden = true;
  $("refresh").hidden = $("signout").hidden = true;
  $("signin").hidden = false;
  say(message || "signed out", Boolean(message));
}

async function signIn() {
  try {
    await call("info");
  } catch (error) {
    signOut(error.message);
    return;
  }
  $("signin").hidden = true;
  $("console").hidden = false;
  $("refresh").hidden = $("signout").hidden = false;
  say("");
  await refresh();
  timer = setInterval(refresh, 5000);
}

$("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key").value = "";
  signIn();
});
$("signout").addEventListener("click", () => signOut());
$("refresh").addEventListener("click", () => refresh());
$("pick").addEventListener("submit", (event) => {
  event.preventDefault();
  room = $("room").value.trim();
  refresh();
});
$("publish").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("notice").value;
  act(async () => {
    const body = room.startsWith("mutable-") || room.startsWith("direct-")
      ? {session: room, text} : {room, text};
    await call("publish", body);
    $("notice").value = "";
    return `published to ${room}`;
  });
});
$("rule").addEventListener("submit", (event) => {
  event.preventDefault();
  const action = $("rule-action").value;
  const body = {[$("rule-target").value]: $("rule-value").value, reason: $("rule-reason").value};
  const duration = $("rule-duration").value;
  if (duration) body.duration = Number(duration);
  if (action === "mute") body.room = room;
  act(async () => {
    const answer = await call(action, body);
    $("rule-value").value = "";
    return `${action} added (${answer.disconnected} closed)`;
  });
});
if (sessionStorage.getItem(KEY)) signIn();
