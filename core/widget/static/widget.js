/* commhub chat widget: one plain script, no framework, no other file.
 *
 *   <script src="https://HUB/widget.js" data-hub="https://HUB" data-title="Chat"
 *           data-color="#2563eb" data-start="Hi! How can I help?" data-lang="en"
 *           data-token="ch1...." data-open="0" async></script>
 *
 * It keeps the conversation id, the user id, the last cursor and the messages not yet
 * stored in localStorage, connects to the hub's WebSocket with both=1 (both sides of
 * the conversation, in stream order, each with its cursor), redraws the conversation
 * after a reload, resumes after a network drop or a hub restart with its last cursor,
 * and draws every message once (by id). Text is only ever set with textContent.
 * The protocol is docs/websocket.md; the widget is docs/widget.md.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.__commhubWidget) return;
  window.__commhubWidget = true;

  var STRINGS = {
    en: {
      open: "Open chat", close: "Minimise chat", unread: "{n} unread", send: "Send",
      placeholder: "Write a message…", label: "Your message", connecting: "Connecting…",
      offline: "Offline: your messages will be sent when the connection is back",
      retry: "Reconnecting in {s} s…", typing: "Typing…", you: "You", bot: "Assistant",
      sending: "Sending", sent: "Sent", queued: "Waiting for the connection",
      joined: "joined", left: "left", expired: "Your session has expired: reload the page",
      refused: "The chat is not available on this page", log: "Conversation"
    },
    fr: {
      open: "Ouvrir le chat", close: "Réduire le chat", unread: "{n} non lus", send: "Envoyer",
      placeholder: "Écrivez un message…", label: "Votre message", connecting: "Connexion…",
      offline: "Hors ligne : vos messages partiront au retour de la connexion",
      retry: "Reconnexion dans {s} s…", typing: "En train d’écrire…", you: "Vous",
      bot: "Assistant", sending: "Envoi", sent: "Envoyé", queued: "En attente de connexion",
      joined: "a rejoint", left: "est parti", expired: "Session expirée : rechargez la page",
      refused: "Le chat n’est pas disponible sur cette page", log: "Conversation"
    },
    de: {
      open: "Chat öffnen", close: "Chat minimieren", unread: "{n} ungelesen", send: "Senden",
      placeholder: "Nachricht schreiben…", label: "Ihre Nachricht", connecting: "Verbinde…",
      offline: "Offline: Ihre Nachrichten werden gesendet, sobald die Verbindung zurück ist",
      retry: "Neuer Versuch in {s} s…", typing: "Schreibt…", you: "Sie", bot: "Assistent",
      sending: "Wird gesendet", sent: "Gesendet", queued: "Wartet auf Verbindung",
      joined: "ist beigetreten", left: "hat verlassen",
      expired: "Sitzung abgelaufen: Seite neu laden",
      refused: "Der Chat ist auf dieser Seite nicht verfügbar", log: "Unterhaltung"
    },
    es: {
      open: "Abrir chat", close: "Minimizar chat", unread: "{n} sin leer", send: "Enviar",
      placeholder: "Escribe un mensaje…", label: "Tu mensaje", connecting: "Conectando…",
      offline: "Sin conexión: tus mensajes se enviarán cuando vuelva",
      retry: "Reconectando en {s} s…", typing: "Escribiendo…", you: "Tú", bot: "Asistente",
      sending: "Enviando", sent: "Enviado", queued: "Esperando conexión",
      joined: "se ha unido", left: "se ha ido", expired: "Sesión caducada: recarga la página",
      refused: "El chat no está disponible en esta página", log: "Conversación"
    }
  };

  // -- settings from the script tag ----------------------------------------------------
  var data = script.dataset;
  var hub = (data.hub || new URL(script.src, location.href).origin).replace(/\/+$/, "");
  var lang = (data.lang || document.documentElement.lang || "en").slice(0, 2).toLowerCase();
  var T = STRINGS[lang] || STRINGS.en;
  if (!STRINGS[lang]) lang = "en";
  var color = /^#[0-9a-fA-F]{3,8}$/.test(data.color || "") ? data.color : "#2563eb";
  var title = data.title || "Chat";
  var token = data.token || "";
  var key = "commhub-widget:" + hub + (token ? ":t" : "");
  var TYPING_MS = 20000;
  var PING_MS = 25000;
  var PONG_MS = 10000;
  var NOTICE = { "handoff-accepted-": "joined", "handoff-end-": "left" };
  var STOP_CODES = { 4400: 1, 4401: 1 };

  function t(name, n) { return T[name].replace("{n}", n).replace("{s}", n); }

  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var a = new Uint8Array(16);
    crypto.getRandomValues(a);
    return Array.prototype.map.call(a, function (b) { return (b + 256).toString(16).slice(1); }).join("");
  }

  // -- what survives a reload ------------------------------------------------------------
  var store = load();
  function load() {
    var s = null;
    try { s = JSON.parse(localStorage.getItem(key) || "null"); } catch (e) { s = null; }
    if (!s || typeof s.conversation !== "string") {
      s = { conversation: "w-" + newId().replace(/-/g, ""), user: null, cursor: 0, seen: 0,
            queue: [], open: data.open === "1" };
    }
    s.queue = Array.isArray(s.queue) ? s.queue : [];
    return s;
  }
  function save() {
    try { localStorage.setItem(key, JSON.stringify(store)); } catch (e) { /* private mode */ }
  }
  if (!store.user && !token) store.user = "w-" + newId().replace(/-/g, "").slice(0, 20);
  save();

  // -- the elements (in a shadow root: the host page's styles do not reach them) --------
  var host = document.createElement("div");
  host.id = "commhub-widget";
  host.setAttribute("data-conversation", store.conversation);
  var root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;
  var CSS = [
    ":host{all:initial}",
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}",
    ".launch{position:fixed;right:16px;bottom:16px;width:56px;height:56px;border-radius:50%;",
    "border:0;background:var(--c);color:#fff;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25);",
    "z-index:2147483000;display:flex;align-items:center;justify-content:center}",
    ".launch svg{width:28px;height:28px;fill:currentColor}",
    ".badge{position:absolute;top:-4px;right:-4px;min-width:22px;height:22px;padding:0 6px;",
    "border-radius:11px;background:#dc2626;color:#fff;font-size:13px;font-weight:700;line-height:22px;",
    "text-align:center}",
    ".badge[hidden],.panel[hidden],.typing[hidden],.status[hidden]{display:none}",
    ".panel{position:fixed;right:16px;bottom:84px;width:380px;max-width:calc(100vw - 32px);",
    "height:560px;max-height:calc(100vh - 100px);display:flex;flex-direction:column;",
    "background:#fff;color:#111827;border-radius:14px;overflow:hidden;",
    "box-shadow:0 10px 40px rgba(0,0,0,.25);z-index:2147483000;font-size:15px}",
    "header{display:flex;align-items:center;gap:8px;padding:12px 14px;background:var(--c);color:#fff}",
    "header h2{flex:1;margin:0;font-size:16px;font-weight:600;overflow:hidden;text-overflow:ellipsis;",
    "white-space:nowrap}",
    "header button{background:transparent;border:0;color:#fff;font-size:22px;line-height:1;",
    "cursor:pointer;padding:2px 8px;border-radius:6px}",
    "button:focus-visible,textarea:focus-visible,a:focus-visible{outline:3px solid #f59e0b;outline-offset:2px}",
    ".status{padding:6px 14px;font-size:13px;background:#fef3c7;color:#78350f}",
    ".log{flex:1;overflow-y:auto;padding:14px;display:flex;flex-direction:column;gap:8px;",
    "background:#f9fafb}",
    ".msg{max-width:85%;display:flex;flex-direction:column;gap:4px}",
    ".msg.in{align-self:flex-end;align-items:flex-end}",
    ".msg.out{align-self:flex-start;align-items:flex-start}",
    ".bubble{padding:8px 12px;border-radius:14px;white-space:pre-wrap;overflow-wrap:anywhere;",
    "line-height:1.35}",
    ".in .bubble{background:var(--c);color:#fff;border-bottom-right-radius:4px}",
    ".out .bubble{background:#fff;border:1px solid #e5e7eb;border-bottom-left-radius:4px}",
    ".agent .bubble{background:#ecfdf5;border-color:#a7f3d0}",
    ".in .bubble a{color:#fff}",
    ".meta{font-size:11px;color:#6b7280}",
    ".pending .bubble{opacity:.7}",
    ".buttons{display:flex;flex-wrap:wrap;gap:6px}",
    ".buttons button{border:1px solid var(--c);background:#fff;color:var(--c);border-radius:16px;",
    "padding:6px 12px;font-size:14px;cursor:pointer}",
    ".buttons button:disabled{opacity:.45;cursor:default}",
    ".notice{align-self:center;font-size:12px;color:#374151;background:#e5e7eb;border-radius:10px;",
    "padding:4px 10px;text-align:center;max-width:90%}",
    ".typing{align-self:flex-start;font-size:13px;color:#6b7280;padding:2px 4px}",
    ".typing span{display:inline-block;width:6px;height:6px;margin-right:3px;border-radius:50%;",
    "background:#9ca3af;animation:b 1s infinite}",
    ".typing span:nth-child(2){animation-delay:.15s}.typing span:nth-child(3){animation-delay:.3s}",
    "@keyframes b{0%,80%,100%{opacity:.3}40%{opacity:1}}",
    "@media (prefers-reduced-motion:reduce){.typing span{animation:none}}",
    "form{display:flex;gap:8px;padding:10px;border-top:1px solid #e5e7eb;background:#fff}",
    "textarea{flex:1;resize:none;border:1px solid #d1d5db;border-radius:10px;padding:8px 10px;",
    "font-size:15px;min-height:40px;max-height:120px;color:#111827}",
    "form button{border:0;border-radius:10px;background:var(--c);color:#fff;padding:0 14px;",
    "font-size:15px;cursor:pointer}",
    ".sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}",
    "@media (max-width:480px){.panel{right:0;left:0;bottom:0;top:0;width:100%;max-width:100%;",
    "height:100%;max-height:100%;border-radius:0}.launch{right:12px;bottom:12px}",
    ".panel:not([hidden])~.launch{display:none}.msg{max-width:92%}}"
  ].join("");
  try {
    var sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    root.adoptedStyleSheets = [sheet];
  } catch (e) {
    el(root, "style").textContent = CSS;
  }

  function el(parent, tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }

  var wrap = el(root, "div");
  wrap.style.setProperty("--c", color);
  wrap.setAttribute("lang", lang);
  var panelId = "commhub-panel";
  var panel = el(wrap, "section", "panel");
  panel.id = panelId;
  panel.setAttribute("role", "dialog");
  panel.setAttribute("aria-label", title);
  var head = el(panel, "header");
  el(head, "h2", null, title);
  var closeBtn = el(head, "button", "close", "\u2212");
  closeBtn.type = "button";
  closeBtn.setAttribute("aria-label", t("close"));
  var status = el(panel, "div", "status");
  status.setAttribute("role", "status");
  var log = el(panel, "div", "log");
  log.setAttribute("role", "log");
  log.setAttribute("aria-live", "polite");
  log.setAttribute("aria-label", t("log"));
  log.tabIndex = 0;
  if (data.start) el(log, "div", "notice greeting", data.start);
  var typing = el(log, "div", "typing");
  for (var i = 0; i < 3; i++) el(typing, "span");
  el(typing, "span", "sr", t("typing"));
  typing.hidden = true;
  var form = el(panel, "form");
  var inputId = "commhub-input";
  var label = el(form, "label", "sr", t("label"));
  label.htmlFor = inputId;
  var input = el(form, "textarea");
  input.id = inputId;
  input.rows = 1;
  input.placeholder = t("placeholder");
  input.maxLength = 4000;
  var sendBtn = el(form, "button", "send", t("send"));
  sendBtn.type = "submit";
  var launch = el(wrap, "button", "launch");
  launch.type = "button";
  launch.setAttribute("aria-controls", panelId);
  var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  var path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", "M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H8l-4 4V6a2 2 0 0 1 2-2z");
  svg.appendChild(path);
  launch.appendChild(svg);
  var badge = el(launch, "span", "badge");
  badge.hidden = true;

  // -- state of this page ----------------------------------------------------------------
  var byId = {};          // message id -> its element: every message is drawn once
  var lastCursor = 0;     // the last message this page drew (its stream sequence)
  var waiting = {};       // ids acked and not yet answered: the typing indicator
  var typingTimer = 0;
  var withAgent = false;  // an agent has the conversation: the bot is silent
  var ws = null;
  var online = false;
  var attempt = 0;
  var retryTimer = 0;
  var pingTimer = 0;
  var pongTimer = 0;
  var wsUrl = data.ws || "";
  var stopped = false;

  // -- drawing ---------------------------------------------------------------------------
  function setOpen(open, focus) {
    store.open = open;
    panel.hidden = !open;
    launch.setAttribute("aria-expanded", String(open));
    if (open) markSeen();
    updateBadge();
    save();
    if (focus) (open ? input : launch).focus();
  }

  function markSeen() {
    if (store.seen < lastCursor) { store.seen = lastCursor; save(); }
  }

  function updateBadge() {
    var n = 0;
    if (!store.open) {
      for (var id in byId) {
        var m = byId[id];
        if (m.dataset.direction === "out" && +m.dataset.cursor > store.seen) n++;
      }
    }
    badge.hidden = n === 0;
    badge.textContent = n > 9 ? "9+" : String(n);
    launch.setAttribute("aria-label", n ? t("open") + ", " + t("unread", n) : t("open"));
    host.setAttribute("data-unread", String(n));
  }

  function setStatus(text) {
    status.hidden = !text;
    status.textContent = text || "";
  }

  function linkify(parent, text) {
    // Plain text with http(s) links made clickable; nothing is parsed as markup.
    var re = /\bhttps?:\/\/[^\s<>"']+/gi;
    var at = 0;
    var m;
    while ((m = re.exec(text))) {
      var raw = m[0].replace(/[.,;:!?)\]]+$/, "");
      parent.appendChild(document.createTextNode(text.slice(at, m.index)));
      var url = null;
      try { url = new URL(raw); } catch (e) { url = null; }
      if (url && (url.protocol === "http:" || url.protocol === "https:")) {
        var a = el(parent, "a", null, raw);
        a.href = url.href;
        a.target = "_blank";
        a.rel = "noopener noreferrer nofollow";
      } else {
        parent.appendChild(document.createTextNode(raw));
      }
      at = m.index + raw.length;
      re.lastIndex = at;
    }
    parent.appendChild(document.createTextNode(text.slice(at)));
  }

  function timeText(ts) {
    var d = new Date(ts * 1000);
    return d.toLocaleTimeString(lang, { hour: "2-digit", minute: "2-digit" });
  }

  function shownText(m) {
    if (m.text) return m.text;
    var p = m.payload || {};
    if (typeof p.title === "string") return p.title;
    if (p.value != null) return String(p.value);
    if (p.start != null) return String(p.start);
    return "";
  }

  function noticeOf(m) {
    if (m.direction !== "out" || !m.reply_to) return null;
    for (var prefix in NOTICE) if (m.reply_to.indexOf(prefix) === 0) return NOTICE[prefix];
    return null;
  }

  function firstPending() {
    var nodes = log.children;
    for (var i = 0; i < nodes.length; i++) {
      if (nodes[i].classList.contains("pending")) return nodes[i];
    }
    return typing;
  }

  function place(node, pending) {
    // Stored messages arrive in cursor order: each goes after the last stored one and
    // before the messages still waiting to be stored, which stay at the end.
    log.insertBefore(node, pending ? typing : firstPending());
  }

  function draw(m, cursor, pending) {
    var id = m.id;
    var node = byId[id];
    if (node) {
      // Drawn already (sent from this page, or seen before a reconnect): update it.
      if (cursor && !node.dataset.cursor) {
        node.dataset.cursor = String(cursor);
        node.classList.remove("pending");
        setMeta(node, m, "");
        place(node, false);
      }
      return node;
    }
    var notice = noticeOf(m);
    var kind = (m.sender && m.sender.kind) || (m.direction === "in" ? "user" : "bot");
    if (notice) {
      node = el(null, "div", "notice");
      node.setAttribute("role", "status");
      node.textContent = shownText(m) || (m.sender && m.sender.name || "") + " " + t(notice);
      withAgent = notice === "joined";
    } else {
      node = el(null, "div", "msg " + (m.direction === "in" ? "in" : "out") +
                (kind === "agent" ? " agent" : ""));
      if (kind === "agent") withAgent = true;
      var who = m.direction === "in" ? T.you : (m.sender && m.sender.name) || T.bot;
      el(node, "span", "sr", who + ":");
      var bubble = el(node, "div", "bubble");
      linkify(bubble, shownText(m));
      var buttons = (m.payload && (m.payload.buttons || m.payload.quick_replies)) || [];
      if (m.direction === "out" && buttons.length) {
        var box = el(node, "div", "buttons");
        box.setAttribute("role", "group");
        buttons.forEach(function (b) {
          if (!b || typeof b.title !== "string") return;
          var button = el(box, "button", null, b.title);
          button.type = "button";
          button.addEventListener("click", function () {
            var payload = {};
            var given = b.payload && typeof b.payload === "object" ? b.payload : {};
            for (var k in given) payload[k] = given[k];
            payload.title = b.title;
            send(null, payload);
          });
        });
      }
      el(node, "span", "meta");
      setMeta(node, m, pending ? (online ? T.sending : T.queued) : "");
    }
    node.dataset.id = id;
    node.dataset.direction = m.direction;
    node.dataset.kind = kind;
    if (cursor) node.dataset.cursor = String(cursor);
    else node.classList.add("pending");
    byId[id] = node;
    place(node, !cursor);
    if (m.direction === "out") disableOldButtons(node);
    return node;
  }

  function setMeta(node, m, state) {
    var meta = node.querySelector(".meta");
    if (!meta) return;
    meta.textContent = "";
    var time = el(meta, "time", null, timeText(m.ts || Date.now() / 1000));
    time.dateTime = new Date((m.ts || Date.now() / 1000) * 1000).toISOString();
    if (m.direction === "out" && m.sender && m.sender.kind === "agent" && m.sender.name) {
      meta.insertBefore(document.createTextNode(m.sender.name + " · "), time);
    }
    if (state) meta.appendChild(document.createTextNode(" · " + state));
  }

  function disableOldButtons(latest) {
    // Only the latest bot message's buttons still mean something.
    var all = log.querySelectorAll(".buttons button");
    for (var i = 0; i < all.length; i++) {
      all[i].disabled = !latest.contains(all[i]);
    }
  }

  var pinned = true;  // the log shows its end: keep it there as it grows or resizes
  function scroll() { log.scrollTop = log.scrollHeight; pinned = true; }
  log.addEventListener("scroll", function () {
    pinned = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  });
  window.addEventListener("resize", function () { if (pinned) scroll(); });

  function showTyping() {
    var any = false;
    for (var k in waiting) { any = true; break; }
    typing.hidden = !any || withAgent;
    log.appendChild(typing);
    clearTimeout(typingTimer);
    if (any) typingTimer = setTimeout(function () { waiting = {}; showTyping(); }, TYPING_MS);
  }

  // -- the connection --------------------------------------------------------------------
  function config(done) {
    if (wsUrl) return done();
    fetch(hub + "/v1/widget", { mode: "cors", credentials: "omit" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (c) { wsUrl = c.ws_url; done(); })
      .catch(function () { retry(); });
  }

  function connect() {
    clearTimeout(retryTimer);
    if (stopped || ws) return;
    if (!wsUrl) return config(connect);
    var url = wsUrl + "?conversation=" + encodeURIComponent(store.conversation) + "&both=1";
    if (store.user) url += "&user=" + encodeURIComponent(store.user);
    if (lastCursor) url += "&after=" + lastCursor;
    if (token) url += "&token=" + encodeURIComponent(token);
    setStatus(attempt ? t("connecting") : "");
    var socket;
    try { socket = new WebSocket(url); } catch (e) { return retry(); }
    ws = socket;
    socket.onmessage = function (e) { if (ws === socket) onFrame(e.data); };
    socket.onclose = function (e) { if (ws === socket) onClose(e.code, e.reason); };
    socket.onerror = function () { /* onclose follows */ };
  }

  function onFrame(raw) {
    var f;
    try { f = JSON.parse(raw); } catch (e) { return; }
    alive();
    if (f.type === "event" && f.event === "connected") {
      online = true;
      attempt = 0;
      setStatus("");
      if (f.user && !store.user) { store.user = f.user; save(); }
      host.setAttribute("data-state", "online");
      flush();
    } else if (f.type === "message") {
      onMessage(f);
    } else if (f.type === "ack") {
      var node = byId[f.id];
      if (node && node.classList.contains("pending")) setMeta(node, queued(f.id) || {}, T.sent);
      dequeue(f.id);
      waiting[f.id] = true;
      showTyping();
      scroll();
    } else if (f.type === "error" && f.id && f.code !== "rate_limited" && f.code !== "unavailable") {
      dequeue(f.id);  // refused for good (a bad frame): never sent again
    }
  }

  function onMessage(f) {
    var stuck = pinned;
    var known = !!byId[f.id];
    draw(f, f.cursor, false);
    if (f.cursor > lastCursor) {
      lastCursor = f.cursor;
      store.cursor = lastCursor;
    }
    if (f.direction === "in") {
      dequeue(f.id);  // stored: it needs no sending again
    } else {
      if (f.reply_to) delete waiting[f.reply_to];
      if (f.sender && f.sender.kind === "agent") waiting = {};
      if (noticeOf(f)) waiting = {};
    }
    if (store.open && document.visibilityState !== "hidden") markSeen();
    save();
    showTyping();
    updateBadge();
    if (stuck || !known) scroll();
  }

  function onClose(code, reason) {
    ws = null;
    online = false;
    stopPing();
    host.setAttribute("data-state", "offline");
    if (STOP_CODES[code]) {
      stopped = true;
      setStatus(/expired/.test(reason || "") ? t("expired") : t("refused"));
      return;
    }
    if (code === 4403) {
      // The conversation belongs to someone else (another login in this browser):
      // start a new one rather than fail forever.
      store.conversation = "w-" + newId().replace(/-/g, "");
      store.cursor = store.seen = 0;
      lastCursor = 0;
      save();
    }
    retry();
  }

  function retry() {
    if (stopped) return;
    attempt++;
    // Exponential backoff with full jitter: 0.5 s doubling, at most 30 s.
    var cap = Math.min(30000, 500 * Math.pow(2, Math.min(attempt, 8)));
    var wait = Math.round(cap / 2 + Math.random() * cap / 2);
    setStatus(navigator.onLine === false ? t("offline") : t("retry", Math.ceil(wait / 1000)));
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, wait);
  }

  function alive() {
    clearTimeout(pongTimer);
    clearTimeout(pingTimer);
    pingTimer = setTimeout(function () {
      if (!ws || !online) return;
      try { ws.send('{"type":"ping"}'); } catch (e) { /* closing */ }
      pongTimer = setTimeout(function () { drop(); }, PONG_MS);
    }, PING_MS);
  }

  function stopPing() { clearTimeout(pingTimer); clearTimeout(pongTimer); }

  function drop() {
    // A connection that went silent (a dead network): close it and start again.
    var socket = ws;
    if (!socket) return;
    ws = null;
    online = false;
    try { socket.close(); } catch (e) { /* already closed */ }
    onCloseAfterDrop();
  }
  function onCloseAfterDrop() { stopPing(); host.setAttribute("data-state", "offline"); retry(); }

  // -- sending ---------------------------------------------------------------------------
  function queued(id) {
    for (var i = 0; i < store.queue.length; i++) if (store.queue[i].id === id) return store.queue[i];
    return null;
  }
  function dequeue(id) {
    var before = store.queue.length;
    store.queue = store.queue.filter(function (q) { return q.id !== id; });
    if (store.queue.length !== before) save();
  }

  function frameOf(q) {
    var f = { type: "message", id: q.id };
    if (q.text) f.text = q.text;
    if (q.payload) f.payload = q.payload;
    return JSON.stringify(f);
  }

  function flush() {
    for (var i = 0; i < store.queue.length; i++) {
      var q = store.queue[i];
      var node = byId[q.id];
      if (node && node.classList.contains("pending")) setMeta(node, q, T.sending);
      try { ws.send(frameOf(q)); } catch (e) { return; }
    }
  }

  function send(text, payload) {
    var q = { id: newId(), text: text || null, payload: payload || null,
              ts: Date.now() / 1000 };
    store.queue.push(q);
    save();
    draw({ id: q.id, direction: "in", text: q.text, payload: q.payload, ts: q.ts,
           sender: { kind: "user" } }, 0, true);
    scroll();
    if (online && ws) {
      try { ws.send(frameOf(q)); } catch (e) { /* sent on reconnect */ }
    } else if (!ws) {
      connect();
    }
  }

  // -- events ----------------------------------------------------------------------------
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = input.value.trim();
    if (!text) return;
    input.value = "";
    send(text, null);
  });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit ? form.requestSubmit() : form.dispatchEvent(new Event("submit"));
    }
  });
  root.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && store.open) setOpen(false, true);
  });
  launch.addEventListener("click", function () { setOpen(!store.open, true); });
  closeBtn.addEventListener("click", function () { setOpen(false, true); });
  window.addEventListener("online", function () { attempt = 0; if (!ws) connect(); });
  window.addEventListener("offline", function () { setStatus(t("offline")); drop(); });
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible" && store.open) { markSeen(); updateBadge(); }
  });
  window.addEventListener("storage", function (e) {
    // Another tab of this site read the conversation: the badge follows.
    if (e.key !== key || !e.newValue) return;
    try {
      var other = JSON.parse(e.newValue);
      if (other.seen > store.seen) { store.seen = other.seen; updateBadge(); }
    } catch (err) { /* not ours */ }
  });

  // -- start -----------------------------------------------------------------------------
  function start() {
    document.body.appendChild(host);
    store.queue.forEach(function (q) {
      draw({ id: q.id, direction: "in", text: q.text, payload: q.payload, ts: q.ts,
             sender: { kind: "user" } }, 0, true);
    });
    setOpen(!!store.open, false);
    connect();
  }
  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start);
})();
