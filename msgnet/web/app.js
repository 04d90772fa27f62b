// The msgnet browser chat: the wire protocol of docs/protocol.md over WebSocket,
// one binary message per msgpack body. It keeps its delivery cursor in
// localStorage, resumes from it after any reconnect, and drops redelivered
// copies by (from, id), as every msgnet client must.
"use strict";

(() => {
  const { encode, decode } = window.MessagePack;
  const $ = (id) => document.getElementById(id);

  const PROTOCOL_VERSION = 1;
  const RECONNECT_DELAYS = [500, 1000, 2000, 4000, 8000]; // ms; the last repeats
  const PERMANENT = new Set(["auth_failed", "unsupported_version"]);
  const MAX_REDIRECTS = 4;

  const state = {
    user: "",
    token: "",
    device: "",
    url: "",
    socket: null,
    connected: false,
    loggedIn: false,
    stopReason: "",
    attempt: 0,
    redirects: 0,
    cursor: null,
    conversations: new Map(), // key -> {key, kind, name, messages[], unread}
    byKey: new Map(), // "from\u0000id" -> message entry
    pending: new Map(), // message id -> outgoing send/gsend, until acked
    requests: new Map(), // rid -> callback
    nextRid: 1,
    selected: null,
    pingTimer: null,
    ackTimer: null,
    acked: null,
  };

  // --- storage: the cursor and the conversation list survive a reload -------

  const storageKey = (what) => `msgnet:${state.user}:${state.device}:${what}`;

  function loadStored() {
    const cursor = localStorage.getItem(storageKey("cursor"));
    state.cursor = cursor === null ? null : Number(cursor);
    const known = JSON.parse(localStorage.getItem(storageKey("conversations")) || "[]");
    for (const [kind, name] of known) conversation(kind, name);
  }

  function saveCursor() {
    if (state.cursor !== null) localStorage.setItem(storageKey("cursor"), String(state.cursor));
  }

  function saveConversations() {
    const list = [...state.conversations.values()].map((c) => [c.kind, c.name]);
    localStorage.setItem(storageKey("conversations"), JSON.stringify(list));
  }

  // --- wire -------------------------------------------------------------------

  function defaultServer() {
    const fromQuery = new URLSearchParams(location.search).get("server");
    if (fromQuery) return fromQuery;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.host}/ws`;
  }

  function send(message) {
    if (!state.socket || state.socket.readyState !== WebSocket.OPEN) return false;
    state.socket.send(encode(message, { ignoreUndefined: true }));
    return true;
  }

  function newId() {
    const bytes = crypto.getRandomValues(new Uint8Array(12));
    return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  function connect() {
    clearTimers();
    setStatus("connecting", "connecting");
    const socket = new WebSocket(state.url);
    socket.binaryType = "arraybuffer";
    state.socket = socket;
    socket.onopen = () => {
      const hello = { t: "hello", version: PROTOCOL_VERSION, user: state.user, token: state.token, device: state.device };
      if (state.cursor !== null) hello.resume = state.cursor;
      socket.send(encode(hello));
    };
    socket.onmessage = (event) => {
      if (socket !== state.socket) return;
      let message;
      try {
        message = decode(new Uint8Array(event.data));
      } catch (error) {
        notice(`undecodable message from the server: ${error}`);
        socket.close(1008, "bad_frame");
        return;
      }
      handle(message);
    };
    socket.onclose = (event) => {
      if (socket !== state.socket) return;
      state.socket = null;
      state.connected = false;
      clearTimers();
      if (!state.loggedIn) return;
      if (state.stopReason) {
        setStatus("offline", "offline");
        notice(state.stopReason);
        return;
      }
      const delay = RECONNECT_DELAYS[Math.min(state.attempt, RECONNECT_DELAYS.length - 1)];
      state.attempt += 1;
      setStatus("connecting", `reconnecting (closed ${event.code})`);
      setTimeout(() => state.loggedIn && !state.socket && connect(), delay * (0.5 + Math.random()));
    };
  }

  function clearTimers() {
    clearInterval(state.pingTimer);
    clearTimeout(state.ackTimer);
    state.pingTimer = state.ackTimer = null;
  }

  // --- incoming ---------------------------------------------------------------

  const handlers = {
    welcome(m) {
      state.connected = true;
      state.attempt = 0;
      state.redirects = 0;
      if (state.cursor === null) {
        state.cursor = m.cursor;
        saveCursor();
      }
      setStatus("connected", "connected");
      notice("");
      const every = Math.max(1000, (m.idle_timeout * 1000) / 3);
      state.pingTimer = setInterval(() => send({ t: "ping", n: 0 }), every);
      // Retry what was never acknowledged, with the same ids: receivers drop copies.
      for (const outgoing of state.pending.values()) send(outgoing);
      for (const c of state.conversations.values()) loadHistory(c);
    },
    redirect(m) {
      state.redirects += 1;
      if (!m.ws_port || state.redirects > MAX_REDIRECTS) {
        state.stopReason = `redirected to ${m.host}:${m.port}, which serves no WebSocket`;
        return;
      }
      const scheme = state.url.startsWith("wss:") ? "wss" : "ws";
      state.url = `${scheme}://${m.host}:${m.ws_port}/ws`;
      state.attempt = 0;
      // The server closes next; onclose reconnects to the new address.
    },
    deliver(m) {
      const kind = m.group ? "group" : "peer";
      const name = m.group || (m.from === state.user ? m.to : m.from);
      addMessage(conversation(kind, name), m, false);
      if (m.offset + 1 > (state.cursor ?? 0)) {
        state.cursor = m.offset + 1;
        saveCursor();
        scheduleAck();
      }
    },
    send_ack(m) {
      const outgoing = state.pending.get(m.id);
      state.pending.delete(m.id);
      const entry = outgoing && state.byKey.get(`${state.user}\u0000${m.id}`);
      if (entry) {
        entry.pending = false;
        entry.ts = m.ts;
        render();
      }
    },
    history_page(m) {
      const done = state.requests.get(m.rid);
      state.requests.delete(m.rid);
      if (done) done(m);
    },
    group_info(m) {
      const done = state.requests.get(m.rid);
      state.requests.delete(m.rid);
      if (done) done(m);
    },
    ping(m) {
      send({ t: "pong", n: m.n });
    },
    pong() {},
    bye(m) {
      notice(`server said goodbye: ${m.reason || "no reason"}`);
    },
    error(m) {
      if (m.rid !== undefined && state.requests.has(m.rid)) {
        state.requests.delete(m.rid);
      }
      if (m.id !== undefined) {
        const entry = state.byKey.get(`${state.user}\u0000${m.id}`);
        if (entry && m.code !== "rate_limited" && m.code !== "unavailable") {
          entry.failed = true;
          state.pending.delete(m.id);
          render();
        }
      }
      notice(`${m.code}: ${m.text}`);
      if (m.fatal && PERMANENT.has(m.code)) state.stopReason = `${m.code}: ${m.text}`;
    },
  };

  function handle(message) {
    const handler = handlers[message.t];
    if (handler) handler(message);
  }

  function scheduleAck() {
    if (state.ackTimer) return;
    state.ackTimer = setTimeout(() => {
      state.ackTimer = null;
      if (state.cursor !== state.acked && send({ t: "dack", cursor: state.cursor })) {
        state.acked = state.cursor;
      }
    }, 1000);
  }

  // --- conversations ----------------------------------------------------------

  function conversation(kind, name) {
    const key = `${kind}:${name}`;
    let c = state.conversations.get(key);
    if (!c) {
      c = { key, kind, name, messages: [], unread: 0, loaded: false };
      state.conversations.set(key, c);
      saveConversations();
      if (state.connected) loadHistory(c);
      render();
    }
    return c;
  }

  function addMessage(c, m, mine) {
    const key = `${m.from}\u0000${m.id}`;
    const known = state.byKey.get(key);
    if (known) {
      // A redelivered copy or the server's echo of our own send.
      if (known.pending && m.ts) {
        known.pending = false;
        known.ts = m.ts;
        render();
      }
      return;
    }
    const entry = { from: m.from, id: m.id, body: m.body, ts: m.ts || Date.now(), seq: m.seq ?? m.offset ?? 0, pending: mine, failed: false };
    state.byKey.set(key, entry);
    c.messages.push(entry);
    c.messages.sort((a, b) => a.ts - b.ts || a.seq - b.seq);
    if (state.selected !== c.key && m.from !== state.user) c.unread += 1;
    render();
  }

  function loadHistory(c) {
    const rid = state.nextRid++ % 2 ** 32;
    state.requests.set(rid, (page) => {
      c.loaded = true;
      for (const e of page.messages) addMessage(c, e, false);
    });
    const request = { t: "history", rid, limit: 50 };
    if (c.kind === "group") request.group = c.name;
    else request.with = c.name;
    send(request);
  }

  function sendMessage(text) {
    const c = state.conversations.get(state.selected);
    if (!c || !text) return;
    const id = newId();
    const outgoing = c.kind === "group"
      ? { t: "gsend", id, group: c.name, body: text }
      : { t: "send", id, to: c.name, body: text };
    state.pending.set(id, outgoing);
    addMessage(c, { from: state.user, id, body: text }, true);
    send(outgoing);
  }

  function groupRequest(kind, name, members) {
    const rid = state.nextRid++ % 2 ** 32;
    state.requests.set(rid, (info) => select(conversation("group", info.group).key));
    const request = kind === "create"
      ? { t: "group_create", rid, group: name, members }
      : { t: "group_join", rid, group: name };
    send(request);
  }

  // --- view -------------------------------------------------------------------

  function setStatus(which, text) {
    const status = $("status");
    status.dataset.state = which;
    status.textContent = text;
  }

  function notice(text) {
    $("notice").textContent = text;
  }

  function select(key) {
    state.selected = key;
    const c = state.conversations.get(key);
    if (c) c.unread = 0;
    render();
    $("body").focus();
  }

  function render() {
    const list = $("conversations");
    list.replaceChildren();
    for (const c of state.conversations.values()) {
      const li = document.createElement("li");
      li.dataset.key = c.key;
      li.className = c.key === state.selected ? "selected" : "";
      const label = document.createElement("span");
      label.textContent = c.kind === "group" ? `# ${c.name}` : c.name;
      li.append(label);
      if (c.unread) {
        const badge = document.createElement("span");
        badge.className = "unread";
        badge.textContent = String(c.unread);
        li.append(badge);
      }
      li.onclick = () => select(c.key);
      list.append(li);
    }

    const c = state.conversations.get(state.selected);
    $("title").textContent = c ? (c.kind === "group" ? `# ${c.name}` : c.name) : "Pick a conversation";
    $("body").disabled = !c;
    $("composer").querySelector("button").disabled = !c;
    const messages = $("messages");
    messages.replaceChildren();
    for (const m of c ? c.messages : []) {
      const li = document.createElement("li");
      li.className = [m.from === state.user ? "mine" : "", m.pending ? "pending" : "", m.failed ? "failed" : ""].join(" ").trim();
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = `${m.from} · ${new Date(m.ts).toLocaleTimeString()}${m.failed ? " · not sent" : ""}`;
      const text = document.createElement("div");
      text.className = "text";
      text.textContent = m.body;
      li.append(meta, text);
      messages.append(li);
    }
    messages.scrollTop = messages.scrollHeight;
  }

  // --- wiring -----------------------------------------------------------------

  $("server").value = defaultServer();

  $("login").onsubmit = (event) => {
    event.preventDefault();
    state.user = $("user").value.trim();
    state.token = $("token").value.trim();
    state.device = $("device").value.trim() || "web";
    state.url = $("server").value.trim();
    state.loggedIn = true;
    state.stopReason = "";
    loadStored();
    $("login").hidden = true;
    $("chat").hidden = false;
    $("logout").hidden = false;
    $("me").textContent = `${state.user} (${state.device})`;
    render();
    connect();
  };

  $("logout").onclick = () => {
    state.loggedIn = false;
    if (state.socket) {
      send({ t: "bye", reason: "logged out" });
      state.socket.close(1000);
    }
    location.reload();
  };

  $("open-peer").onsubmit = (event) => {
    event.preventDefault();
    const peer = $("peer").value.trim();
    if (!peer) return;
    select(conversation("peer", peer).key);
    $("peer").value = "";
  };

  $("group-form").onsubmit = (event) => {
    event.preventDefault();
    const name = $("group-name").value.trim();
    const members = $("group-members").value.split(",").map((s) => s.trim()).filter(Boolean);
    groupRequest(event.submitter && event.submitter.name === "join" ? "join" : "create", name, members);
    $("group-name").value = "";
    $("group-members").value = "";
  };

  $("composer").onsubmit = (event) => {
    event.preventDefault();
    sendMessage($("body").value);
    $("body").value = "";
  };

  // For tests and debugging: drop the connection as a network failure would.
  window.msgnetChat = { state, dropConnection: () => state.socket && state.socket.close(4000, "dropped") };
})();
