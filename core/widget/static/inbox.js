/* commhub inbox: the conversations waiting for a person; take one, answer, hand it back
 * or close it. Plain JavaScript; every text from the hub is set with textContent.
 * While this page is open the agent is present: it sends a heartbeat every 10 s
 * (POST /v1/inbox/presence), so the bot hands conversations over only while someone is
 * here. The API is in core/widget/inbox.py; the page in docs/widget.md. */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var TOKEN_KEY = "commhub-inbox-token";
  var NAME_KEY = "commhub-inbox-name";
  var AGENT_KEY = "commhub-inbox-agent";
  var BEAT_MS = 10000;

  // -- who this page is --------------------------------------------------------------------
  var params = new URLSearchParams(location.search);
  if (params.get("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    params.delete("token");
    history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
  }
  var agent = sessionStorage.getItem(AGENT_KEY);
  if (!agent) {
    var bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    agent = "inbox-" + Array.prototype.map.call(bytes, function (b) {
      return (b + 256).toString(16).slice(1);
    }).join("");
    sessionStorage.setItem(AGENT_KEY, agent);
  }
  var nameInput = $("agent-name");
  nameInput.value = localStorage.getItem(NAME_KEY) || "Agent";
  function name() { return nameInput.value.trim() || "Agent"; }
  nameInput.addEventListener("change", function () {
    localStorage.setItem(NAME_KEY, name());
    beat();
  });
  $("name-form").addEventListener("submit", function (e) { e.preventDefault(); nameInput.blur(); });

  // -- talking to the hub ------------------------------------------------------------------
  function api(method, path, body) {
    var headers = { "Content-Type": "application/json" };
    var token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    return fetch(path, { method: method, headers: headers, keepalive: method === "POST",
                         body: body ? JSON.stringify(body) : undefined })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (data) {
          if (r.status === 401) askToken(data.error && data.error.message);
          if (!r.ok) {
            var err = new Error((data.error && data.error.message) || ("HTTP " + r.status));
            err.status = r.status;
            err.code = data.error && data.error.code;
            throw err;
          }
          return data;
        });
      });
  }

  function askToken(message) {
    $("token-form").hidden = false;
    $("token-error").textContent = message || "";
  }
  $("token-form").addEventListener("submit", function (e) {
    e.preventDefault();
    var token = $("token-input").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("token-form").hidden = true;
    beat();
  });

  // -- presence ----------------------------------------------------------------------------
  function beat() {
    return api("POST", "/v1/inbox/presence", { agent: agent, name: name() })
      .then(function () {
        document.body.dataset.present = "1";
        $("presence").textContent = "Available as " + name();
      })
      .catch(function (e) {
        document.body.dataset.present = "0";
        $("presence").textContent = "Not available: " + e.message;
      });
  }
  beat();
  setInterval(beat, BEAT_MS);
  window.addEventListener("pagehide", function () {
    api("POST", "/v1/inbox/presence/leave", { agent: agent }).catch(function () {});
  });

  // -- the list ----------------------------------------------------------------------------
  var version = null;
  var items = [];
  var selected = null;

  function listLoop() {
    var path = "/v1/inbox/conversations" + (version === null ? "" : "?wait=25&version=" + version);
    api("GET", path).then(function (data) {
      version = data.version;
      items = data.conversations;
      drawList();
      if (selected) drawActions();
      listLoop();
    }).catch(function () { setTimeout(listLoop, 2000); });
  }

  function reasonText(r) {
    if (!r) return "";
    var what = r.decision === "fallback" ? "no workflow was sure" :
      r.decision === "clarify" ? "two workflows were too close" :
      "classified as " + (r.workflow || "none");
    return what + " (confidence " + Math.round(r.confidence * 100) + "%, threshold " +
      Math.round(r.threshold * 100) + "%)" + (r.text ? " on “" + r.text + "”" : "");
  }

  function since(ts) {
    var s = Math.max(0, Math.round(Date.now() / 1000 - ts));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return new Date(ts * 1000).toLocaleString();
  }

  function drawList() {
    var list = $("queue");
    list.textContent = "";
    $("queue-count").textContent = String(items.length);
    $("queue-empty").hidden = items.length > 0;
    items.forEach(function (c) {
      var li = document.createElement("li");
      var status = c.taken_by ? "taken" : "waiting";
      li.dataset.conversation = c.conversation;
      li.dataset.status = status;
      var b = document.createElement("button");
      b.type = "button";
      if (c.conversation === selected) b.setAttribute("aria-current", "true");
      add(b, "span", "who", (c.user || "unknown user") + " · " + (c.channel || "?"));
      add(b, "span", "status", c.taken_by ? "with " + c.taken_by.name : "waiting");
      add(b, "span", "when", "handed over " + since(c.since) + " · " + c.conversation);
      if (c.reason) add(b, "span", "why", reasonText(c.reason));
      b.addEventListener("click", function () { select(c.conversation); });
      li.appendChild(b);
      list.appendChild(li);
    });
  }

  function add(parent, tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    e.textContent = text;
    parent.appendChild(e);
    return e;
  }

  // -- one conversation --------------------------------------------------------------------
  var cursor = 0;
  var seen = {};
  var pollTimer = 0;

  function current() {
    for (var i = 0; i < items.length; i++) if (items[i].conversation === selected) return items[i];
    return null;
  }

  function select(conversation) {
    selected = conversation;
    cursor = 0;
    seen = {};
    $("transcript").textContent = "";
    $("reason").textContent = "";
    $("action-error").textContent = "";
    $("detail").hidden = false;
    $("detail-title").textContent = "Conversation " + conversation;
    drawList();
    drawActions();
    clearTimeout(pollTimer);
    poll();
  }

  function poll() {
    var conversation = selected;
    api("GET", "/v1/inbox/conversations/" + encodeURIComponent(conversation) + "?after=" + cursor)
      .then(function (data) {
        if (conversation !== selected) return;
        data.messages.forEach(drawMessage);
        cursor = data.cursor;
        var c = data.classifications;
        var r = $("reason");
        if (c.length) r.textContent = "Sent here because " + reasonText(c[c.length - 1]) +
          (c.length > 1 ? " — " + c.length + " classifications in this conversation" : "");
        var st = data.state;
        $("detail-meta").textContent = st ? "User " + (st.user || "?") + " on " +
          (st.channel || "?") + " · workflow " + (st.workflow || "none") + ", state " +
          (st.state || "none") : "";
        $("detail").dataset.handoff = st && st.handoff ? "1" : "0";
        drawActions();
      })
      .catch(function (e) {
        // Handed back or closed: the transcript stays as it was, and polling stops.
        if (e.status === 404 && conversation === selected) { selected = null; return "stop"; }
      })
      .then(function (stop) {
        if (stop !== "stop" && conversation === selected) pollTimer = setTimeout(poll, 1000);
      });
  }

  function drawMessage(m) {
    if (seen[m.id]) return;
    seen[m.id] = true;
    var list = $("transcript");
    var stick = list.scrollHeight - list.scrollTop - list.clientHeight < 30;
    var li = document.createElement("li");
    var kind = m.sender && m.sender.kind;
    li.className = m.direction + (kind === "agent" ? " agent" : "");
    li.dataset.id = m.id;
    li.dataset.direction = m.direction;
    li.dataset.kind = kind || "";
    var who = m.direction === "in" ? (m.sender.id || "user") :
      (m.sender.name || m.sender.id || "bot");
    add(li, "span", "from", who + " · " + new Date(m.ts * 1000).toLocaleTimeString());
    var text = m.text;
    if (!text && m.payload) text = m.payload.title || m.payload.value || m.payload.start || "";
    li.appendChild(document.createTextNode(text || ""));
    var buttons = m.payload && m.payload.buttons;
    if (buttons && buttons.length) {
      add(li, "span", "from", "buttons: " + buttons.map(function (b) { return b.title; }).join(", "));
    }
    list.appendChild(li);
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function drawActions() {
    var c = current();
    var mine = !!(c && c.taken_by && c.taken_by.agent === agent);
    $("take").hidden = !c || !!c.taken_by;
    $("release").hidden = !mine;
    $("close").hidden = !mine;
    $("reply-form").hidden = !mine;
    $("detail").dataset.mine = mine ? "1" : "0";
    if (!c && $("detail").hidden === false) {
      $("detail-title").textContent = $("detail-title").textContent.replace(/ \(.*\)$/, "") +
        " (no longer handed over)";
    }
  }

  function act(what, body) {
    $("action-error").textContent = "";
    var payload = { agent: agent, name: name() };
    for (var k in body || {}) payload[k] = body[k];
    return api("POST", "/v1/inbox/conversations/" + encodeURIComponent(selected) + "/" + what,
               payload)
      .catch(function (e) { $("action-error").textContent = e.message; throw e; });
  }

  $("take").addEventListener("click", function () {
    act("take").then(function (data) {
      var c = current();
      if (c) c.taken_by = data.taken_by;
      drawList();
      drawActions();
      $("reply-input").focus();
    }).catch(function () {});
  });
  $("release").addEventListener("click", function () { act("release").catch(function () {}); });
  $("close").addEventListener("click", function () { act("close").catch(function () {}); });
  $("reply-form").addEventListener("submit", function (e) {
    e.preventDefault();
    var input = $("reply-input");
    var text = input.value.trim();
    if (!text) return;
    act("messages", { text: text }).then(function () { input.value = ""; }).catch(function () {});
  });
  $("reply-input").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("reply-form").requestSubmit();
  });

  listLoop();
})();
