// commhub dashboard: charts and a SQL box over the hub's records, in plain JavaScript.
//
// Every number on the page comes from one SQL query sent to POST /v1/sql (the hub's
// sandboxed, read-only SQL). Each chart shows the exact query under "Data and SQL", so an
// analyst can run it anywhere else (`commhub sql`, the bus API, DuckDB on an export).
//
// Safety: recorded text is user input. It only ever reaches the page through textContent
// and setAttribute, never innerHTML, and the page's Content-Security-Policy allows no
// inline script, so a message that contains markup stays text.
//
// The SQL token (when the hub needs one) comes from `?token=` once, or from the token
// field, and is kept in sessionStorage: it lives as long as the browser tab and is removed
// from the address bar at once, so it does not end up in bookmarks or shared links.
"use strict";

(() => {
  const TOKEN_KEY = "commhub.sqlToken";
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Okabe-Ito: distinguishable with the common kinds of colour blindness.
  const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00",
    "#8C6D1F", "#000000"];
  const FALLBACK_COLOR = "#D55E00";
  const ROUTED_COLOR = "#0072B2";
  const CLARIFY_COLOR = "#E69F00";

  // ---------------------------------------------------------------- the SQL endpoint
  class SqlError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
    get needsToken() { return this.status === 401 || this.status === 403; }
    toString() { return `${this.code}: ${this.message}`; }
  }

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  function setToken(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  }

  // Take ?token= from the address once, then drop it from the address bar and history.
  function adoptUrlToken() {
    const url = new URL(window.location.href);
    if (!url.searchParams.has("token")) return;
    setToken(url.searchParams.get("token"));
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }

  // Run one query; resolves to {columns, rows, truncated}, rejects with a SqlError.
  async function runSql(sql, maxRows) {
    const headers = { "Content-Type": "application/json" };
    if (token()) headers.Authorization = `Bearer ${token()}`;
    const request = { sql };
    if (maxRows) request.max_rows = maxRows;
    let response;
    try {
      // Relative to /dashboard, so the page also works behind a path-prefixing proxy.
      response = await fetch("v1/sql", {
        method: "POST", headers, body: JSON.stringify(request), cache: "no-store",
      });
    } catch (error) {
      throw new SqlError(0, "network", `the hub did not answer (${error.message})`);
    }
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
    if (!response.ok || !body || body.error) {
      const error = (body && body.error) || {};
      throw new SqlError(response.status, error.code || `http_${response.status}`,
        error.message || response.statusText || "no readable answer");
    }
    return body;
  }

  function objects(result) {
    return result.rows.map((row) => Object.fromEntries(result.columns.map((c, i) => [c, row[i]])));
  }

  // ---------------------------------------------------------------- filters as SQL
  const filters = { channel: "", from: "", to: "" };
  const DATE = /^\d{4}-\d{2}-\d{2}$/;

  function quote(text) { return `'${String(text).replace(/'/g, "''")}'`; }

  // Conditions on a timestamp (or date) column and a channel column; [] when unset.
  function dayConditions(column) {
    const out = [];
    if (DATE.test(filters.from)) out.push(`CAST(${column} AS DATE) >= DATE ${quote(filters.from)}`);
    if (DATE.test(filters.to)) out.push(`CAST(${column} AS DATE) <= DATE ${quote(filters.to)}`);
    return out;
  }
  function channelConditions(column) {
    return filters.channel ? [`${column} = ${quote(filters.channel)}`] : [];
  }
  function where(conditions, keyword = "WHERE") {
    return conditions.length ? `${keyword} ${conditions.join("\n  AND ")}` : "";
  }
  function sqlText(lines) { return lines.filter((line) => line !== "").join("\n"); }

  // The queries behind the page. docs/dashboard.md shows each of them.
  const QUERIES = {
    channels: () => "SELECT DISTINCT channel FROM messages ORDER BY channel",

    totals: () => sqlText([
      "SELECT",
      "  count(*) AS messages,",
      "  count(DISTINCT conversation) AS conversations,",
      "  count(DISTINCT sender_id) FILTER (WHERE direction = 'in') AS active_users",
      "FROM messages",
      where([...dayConditions("ts"), ...channelConditions("channel")]),
    ]),

    volume: () => sqlText([
      "SELECT day, channel, messages_in, messages_out, conversations",
      "FROM message_volume_daily",
      where([...dayConditions("day"), ...channelConditions("channel")]),
      "ORDER BY day, channel",
    ]),

    intents: () => sqlText([
      "SELECT",
      "  CASE WHEN c.decision = 'clarify' THEN '(clarify)'",
      "    ELSE coalesce(c.workflow, '(none)') END AS workflow,",
      "  count(*) AS classifications,",
      "  avg(c.confidence) AS mean_confidence",
      "FROM classifications c",
      "LEFT JOIN messages m ON m.id = c.message_id",
      where([...dayConditions("c.ts"), ...channelConditions("m.channel")]),
      "GROUP BY ALL",
      "ORDER BY classifications DESC, workflow",
    ]),

    fallback: () => sqlText([
      "SELECT",
      "  day,",
      "  CAST(sum(classifications) AS BIGINT) AS classifications,",
      "  CAST(sum(fallbacks) AS BIGINT) AS fallbacks,",
      "  sum(fallbacks) / sum(classifications) AS fallback_rate",
      "FROM fallback_rate_daily",
      where([...dayConditions("day"), ...channelConditions("channel")]),
      "GROUP BY day",
      "ORDER BY day",
    ]),

    confidence: () => sqlText([
      "SELECT",
      "  CAST(least(greatest(floor(c.confidence * 10), 0), 9) AS INTEGER) AS bucket,",
      "  count(*) FILTER (WHERE c.workflow IS NOT NULL) AS routed,",
      "  count(*) FILTER (WHERE c.decision = 'fallback') AS fallbacks,",
      "  count(*) FILTER (WHERE c.decision = 'clarify') AS clarified",
      "FROM classifications c",
      "LEFT JOIN messages m ON m.id = c.message_id",
      where([...dayConditions("c.ts"), ...channelConditions("m.channel")]),
      "GROUP BY ALL",
      "ORDER BY bucket",
    ]),

    // The threshold the latest classification was judged against (the hub's setting).
    threshold: () => "SELECT arg_max(threshold, ts) AS threshold FROM classifications",

    // How the fallback's runs ended: its own "completed" (any final state) says little.
    fallbackRuns: () => sqlText([
      "WITH handed AS (SELECT DISTINCT run_id FROM workflow_events WHERE kind = 'handoff')",
      "SELECT",
      "  count(*) AS runs,",
      "  count(*) FILTER (WHERE run_id IN (SELECT run_id FROM handed)) AS handed_off,",
      "  count(*) FILTER (WHERE run_id NOT IN (SELECT run_id FROM handed)",
      "    AND outcome = 'cancelled') AS went_on,",
      "  count(*) FILTER (WHERE run_id NOT IN (SELECT run_id FROM handed)",
      "    AND outcome = 'open') AS open",
      "FROM workflow_runs",
      where([
        "workflow = 'fallback'",
        ...dayConditions("started_ts"),
        ...(filters.channel
          ? [`conversation IN (SELECT conversation FROM messages WHERE channel = ${quote(filters.channel)})`]
          : []),
      ]),
    ]),

    latency: () => sqlText([
      "SELECT",
      "  coalesce(channel, '(all)') AS channel,",
      "  count(*) AS responses,",
      "  quantile_cont(seconds, 0.5) AS p50_seconds,",
      "  quantile_cont(seconds, 0.95) AS p95_seconds",
      "FROM first_response_latency",
      where([...dayConditions("in_ts"), ...channelConditions("channel")]),
      "GROUP BY GROUPING SETS ((channel), ())",
      "ORDER BY grouping(channel) DESC, channel",
    ]),

    // Runs started in the range (in conversations on the channel), and per state how many
    // of them reached it; states are ordered by the earliest step that reached them.
    funnel: () => sqlText([
      "WITH runs AS (",
      "  SELECT DISTINCT run_id",
      "  FROM workflow_events",
      where([
        "kind = 'started'",
        ...dayConditions("ts"),
        ...(filters.channel
          ? [`conversation IN (SELECT conversation FROM messages WHERE channel = ${quote(filters.channel)})`]
          : []),
      ], "  WHERE"),
      "),",
      "steps AS (",
      "  SELECT workflow, run_id, kind, to_state,",
      "    row_number() OVER (PARTITION BY run_id ORDER BY ts, kind <> 'started') AS step",
      "  FROM workflow_events",
      "  WHERE run_id IN (SELECT run_id FROM runs) AND kind <> 'emitted'",
      "),",
      // Completed by the run's outcome: a run that ends in its own 'cancelled' final
      // state is cancelled, not completed (docs/records.md, Outcomes).
      "outcomes AS (",
      "  SELECT workflow,",
      "    count(*) AS started,",
      "    count(*) FILTER (WHERE outcome = 'completed') AS completed",
      "  FROM workflow_runs",
      "  WHERE run_id IN (SELECT run_id FROM runs)",
      "  GROUP BY workflow",
      ")",
      "SELECT",
      "  s.workflow,",
      "  s.to_state AS state,",
      "  count(DISTINCT s.run_id) AS runs,",
      "  min(s.step) AS first_step,",
      "  o.started,",
      "  o.completed",
      "FROM steps s",
      "JOIN outcomes o ON o.workflow = s.workflow",
      "WHERE s.to_state IS NOT NULL",
      "GROUP BY s.workflow, s.to_state, o.started, o.completed",
      "ORDER BY s.workflow, first_step, state",
    ]),
  };

  // The conversations list: the page's channel and dates, plus its own workflow,
  // outcome and text filters. A conversation is in the date range when it was active in
  // it (its first message before the end, its last after the start).
  const convFilters = { workflow: "", outcome: "", text: "" };
  function likePattern(text) {
    return quote(`%${text.replace(/[\\%_]/g, (c) => `\\${c}`)}%`);
  }
  const CONVERSATION_QUERIES = {
    workflows: () => "SELECT DISTINCT workflow FROM workflow_runs ORDER BY workflow",

    conversations: () => sqlText([
      "SELECT conversation, channel, user_id, first_ts, last_ts, messages, workflows,",
      "  last_workflow, outcome",
      "FROM conversations",
      where([
        ...(DATE.test(filters.from) ? [`CAST(last_ts AS DATE) >= DATE ${quote(filters.from)}`] : []),
        ...(DATE.test(filters.to) ? [`CAST(first_ts AS DATE) <= DATE ${quote(filters.to)}`] : []),
        ...channelConditions("channel"),
        ...(convFilters.workflow ? [`list_contains(workflows, ${quote(convFilters.workflow)})`] : []),
        ...(convFilters.outcome ? [`outcome = ${quote(convFilters.outcome)}`] : []),
        ...(convFilters.text ? [`conversation IN (SELECT conversation FROM messages\n` +
          `    WHERE text ILIKE ${likePattern(convFilters.text)} ESCAPE '\\')`] : []),
      ]),
      "ORDER BY last_ts DESC, conversation",
      "LIMIT 200",
    ]),

    // One conversation's records on one timeline (UTC), in time order.
    transcript: (id) => sqlText([
      "SELECT ts, 'message' AS source, direction AS kind,",
      "  sender_kind || ' ' || coalesce(sender_name, sender_id) AS who,",
      "  coalesce(text, json_extract_string(payload, '$.title'), CAST(payload AS VARCHAR)) AS text,",
      "  CASE WHEN json_array_length(payload -> '$.buttons') > 0 THEN 'buttons: ' ||",
      "    array_to_string(CAST(json_extract_string(payload, '$.buttons[*].title') AS VARCHAR[]), ', ')",
      "  END AS detail,",
      "  stream_seq AS seq",
      `FROM messages WHERE conversation = ${quote(id)}`,
      "UNION ALL",
      "SELECT ts, 'classification', coalesce(decision, 'workflow'), coalesce(workflow, '(none)'),",
      "  text, printf('confidence %.2f, threshold %.2f', confidence, threshold), NULL",
      `FROM classifications WHERE conversation = ${quote(id)}`,
      "UNION ALL",
      "SELECT ts, 'workflow', kind, workflow, event,",
      "  concat_ws(' ', concat_ws(' → ', from_state, to_state), 'on ' || trigger), NULL",
      `FROM workflow_events WHERE conversation = ${quote(id)}`,
      "UNION ALL",
      "SELECT ts, 'input', event, sender_kind || ' ' || coalesce(sender_name, sender_id), NULL,",
      "  CAST(data AS VARCHAR), NULL",
      `FROM workflow_inputs WHERE conversation = ${quote(id)}`,
      "UNION ALL",
      "SELECT ts, 'channel', kind, channel, reason, 'code ' || code, NULL",
      `FROM channel_events WHERE conversation = ${quote(id)}`,
      // Records of one step share its time: the input, what the router decided, the
      // workflow's step, then the replies.
      "ORDER BY ts, CASE source WHEN 'message' THEN (CASE kind WHEN 'in' THEN 0 ELSE 3 END)",
      "  WHEN 'input' THEN 0 WHEN 'classification' THEN 1 WHEN 'workflow' THEN 2 ELSE 4 END,",
      "  seq NULLS LAST",
    ]),
  };

  // ---------------------------------------------------------------- DOM and SVG helpers
  function h(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value !== undefined && value !== null) node.setAttribute(name, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function s(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value !== undefined && value !== null) node.setAttribute(name, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // data-* attributes from {key: value}: carried on every mark so the numbers behind a
  // picture can be read by tools (and by the browser test).
  function data(values) {
    const out = {};
    for (const [key, value] of Object.entries(values)) out[`data-${key}`] = value;
    return out;
  }

  const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  function fmtInt(n) { return integer.format(n); }
  function fmtPct(x) {
    if (x === null || x === undefined) return "–";
    return `${(100 * x).toFixed(x > 0 && x < 0.1 ? 1 : 0)}%`;
  }
  function fmtConf(x) { return x === null || x === undefined ? "–" : x.toFixed(2); }
  function fmtSeconds(x) {
    if (x === null || x === undefined) return "–";
    if (x < 1) return `${Math.round(x * 1000)} ms`;
    return `${x.toFixed(x < 10 ? 2 : 1)} s`;
  }
  function fmtCell(value) {
    if (value === null || value === undefined) return "NULL";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  // A round upper bound for an axis, and its tick step (1, 2 or 5 times a power of ten).
  function niceScale(max, ticks = 4) {
    if (!(max > 0)) return { max: 1, step: 0.25 };
    const raw = max / ticks;
    const power = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * power).find((m) => m >= raw);
    return { max: Math.ceil(max / step) * step, step };
  }

  // A channel keeps its colour whatever other channels appear: the built-in ones have
  // their own, any other is picked by a hash of its name (not by its place in a list,
  // which shifted every colour when a channel sorting before it appeared).
  const CHANNEL_COLORS = { websocket: "#0072B2", http: "#E69F00", telegram: "#009E73" };
  const OTHER_COLORS = ["#CC79A7", "#56B4E9", "#D55E00", "#8C6D1F", "#000000", "#7B61A8"];
  function colorFor(key) {
    if (CHANNEL_COLORS[key]) return CHANNEL_COLORS[key];
    let hash = 0;
    for (const ch of String(key)) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    return OTHER_COLORS[hash % OTHER_COLORS.length];
  }

  function legend(items) {
    // An SVG swatch: its fill is an attribute, which the page's CSP allows (inline styles
    // it does not).
    return h("ul", { class: "legend" }, items.map(([label, color]) =>
      h("li", {}, s("svg", { class: "swatch", viewBox: "0 0 12 12", "aria-hidden": "true" },
        s("rect", { width: 12, height: 12, rx: 2, fill: color })), label)));
  }

  // Columns over categories, each column a stack of series. values(category, series)
  // returns {value, attrs, title} or null. Used for volume, fallback and confidence.
  function columnChart({ categories, series, values, label, yFormat, yMax, xFormat, width = 640,
    marker = null }) {
    const height = 240;
    const m = { top: 12, right: 12, bottom: 42, left: 52 };
    const plotW = width - m.left - m.right;
    const plotH = height - m.top - m.bottom;
    let top = 0;
    for (const category of categories) {
      let sum = 0;
      for (const serie of series) sum += (values(category, serie.key) || { value: 0 }).value || 0;
      top = Math.max(top, sum);
    }
    const scale = yMax ? { max: yMax, step: yMax / 4 } : niceScale(top);
    const y = (v) => m.top + plotH - (v / scale.max) * plotH;
    const band = plotW / Math.max(categories.length, 1);
    const barW = Math.max(2, Math.min(48, band * 0.7));
    const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label });
    svg.append(s("title", {}, label));
    const axis = s("g", { class: "axis", "aria-hidden": "true" });
    for (let v = 0; v <= scale.max + scale.step / 2; v += scale.step) {
      axis.append(s("line", { x1: m.left, x2: width - m.right, y1: y(v), y2: y(v), class: "grid" }));
      axis.append(s("text", { x: m.left - 6, y: y(v) + 4, "text-anchor": "end" }, yFormat(v)));
    }
    // Label at most about 10 categories, evenly, so long ranges stay readable.
    const every = Math.max(1, Math.ceil(categories.length / 10));
    categories.forEach((category, i) => {
      if (i % every !== 0) return;
      const x = m.left + band * i + band / 2;
      axis.append(s("text", { x, y: height - m.bottom + 16, "text-anchor": "middle" },
        xFormat ? xFormat(category) : category));
    });
    svg.append(axis);
    const marks = s("g", { class: "marks" });
    categories.forEach((category, i) => {
      let base = 0;
      const x = m.left + band * i + (band - barW) / 2;
      for (const serie of series) {
        const point = values(category, serie.key);
        if (!point || !(point.value > 0)) continue;
        const rect = s("rect", {
          class: "bar", x, width: barW, y: y(base + point.value),
          height: Math.max(1, y(base) - y(base + point.value)), fill: serie.color,
          ...point.attrs,
        }, s("title", {}, point.title));
        marks.append(rect);
        base += point.value;
      }
    });
    svg.append(marks);
    if (marker) {
      // A vertical line at a position in category units (the threshold on the
      // confidence axis), with its label.
      const x = m.left + band * marker.at;
      const g = s("g", { class: "marker", ...marker.attrs });
      g.append(s("line", { x1: x, x2: x, y1: m.top, y2: m.top + plotH, stroke: "#1c2430",
        "stroke-width": 2, "stroke-dasharray": "5 4" }));
      g.append(s("text", { x: x + 4, y: m.top + 12, class: "marker-label" }, marker.label));
      g.append(s("title", {}, marker.label));
      svg.append(g);
    }
    return svg;
  }

  // Horizontal bars with a label on the left and the value text on the right.
  function barList({ rows, max, label, width = 640 }) {
    const rowH = 26;
    const labelW = 170;
    const textW = 120;
    const height = rows.length * rowH + 8;
    const plotW = width - labelW - textW;
    const top = max || Math.max(...rows.map((r) => r.value), 0) || 1;
    const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label });
    svg.append(s("title", {}, label));
    rows.forEach((row, i) => {
      const yTop = 4 + i * rowH;
      const w = Math.max(row.value > 0 ? 2 : 0, (row.value / top) * plotW);
      const g = s("g", { class: "row" });
      g.append(s("text", { x: labelW - 8, y: yTop + rowH / 2 + 4, "text-anchor": "end", class: "label" },
        row.label));
      g.append(s("rect", {
        class: "bar", x: labelW, y: yTop + 4, width: w, height: rowH - 8,
        fill: row.color || ROUTED_COLOR, ...row.attrs,
      }, s("title", {}, `${row.label}: ${row.text}`)));
      g.append(s("text", { x: labelW + w + 6, y: yTop + rowH / 2 + 4, class: "value" }, row.text));
      svg.append(g);
    });
    return svg;
  }

  function resultTable(result, caption) {
    const numeric = result.columns.map((_, i) => result.rows.length > 0 &&
      result.rows.every((row) => row[i] === null || typeof row[i] === "number"));
    return h("table", {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, result.columns.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, result.rows.map((row) => h("tr", {}, row.map((value, i) =>
        h("td", { class: [numeric[i] ? "num" : "", value === null ? "null" : ""].join(" ").trim() || null },
          fmtCell(value)))))));
  }

  function details(results) {
    return h("details", { class: "data" }, h("summary", {}, "Data and SQL"),
      results.map(([sql, result]) => [h("pre", { class: "sql" }, h("code", {}, sql)),
        result ? resultTable(result) : null]));
  }

  function chartBox(section) { return document.querySelector(`#${section} .chart`); }

  function show(section, ...content) {
    chartBox(section).replaceChildren(...content.flat().filter(Boolean));
  }

  function empty() { return h("p", { class: "empty" }, "No data for these filters."); }

  function failure(error) {
    return h("p", { class: "error", role: "alert" }, `Could not load: ${error}`);
  }

  // ---------------------------------------------------------------- the charts
  let allChannels = [];

  const CHARTS = {
    "chart-volume": {
      queries: ["volume"],
      render([result], width) {
        const rows = objects(result);
        if (!rows.length) return [empty()];
        const days = [...new Set(rows.map((r) => r.day))];
        const channels = [...new Set(rows.map((r) => r.channel))].sort();
        const byKey = new Map(rows.map((r) => [`${r.day}|${r.channel}`, r]));
        const svg = columnChart({
          width,
          categories: days,
          series: channels.map((c) => ({ key: c, color: colorFor(c) })),
          values(day, channel) {
            const r = byKey.get(`${day}|${channel}`);
            if (!r) return null;
            const total = r.messages_in + r.messages_out;
            return {
              value: total,
              attrs: data({ day, channel, in: r.messages_in, out: r.messages_out, value: total }),
              title: `${day}, ${channel}: ${fmtInt(total)} messages (${fmtInt(r.messages_in)} in, ${fmtInt(r.messages_out)} out)`,
            };
          },
          label: `Messages per day and channel, ${days.length} day(s), ${channels.length} channel(s)`,
          yFormat: fmtInt,
          xFormat: (day) => day.slice(5),
        });
        return [svg, legend(channels.map((c) => [c, colorFor(c)]))];
      },
    },

    "chart-intents": {
      queries: ["intents"],
      render([result], width) {
        const rows = objects(result);
        if (!rows.length) return [empty()];
        return [barList({
          width,
          rows: rows.map((r) => ({
            label: r.workflow,
            value: r.classifications,
            text: `${fmtInt(r.classifications)} · conf ${fmtConf(r.mean_confidence)}`,
            color: r.workflow === "(none)" ? FALLBACK_COLOR
              : r.workflow === "(clarify)" ? CLARIFY_COLOR : ROUTED_COLOR,
            attrs: data({ workflow: r.workflow, value: r.classifications, confidence: r.mean_confidence }),
          })),
          label: `Intent mix: ${rows.map((r) => `${r.workflow} ${r.classifications}`).join(", ")}`,
        })];
      },
    },

    "chart-fallback": {
      queries: ["fallback"],
      render([result], width) {
        const rows = objects(result);
        if (!rows.length) return [empty()];
        const total = rows.reduce((n, r) => n + r.classifications, 0);
        const fallbacks = rows.reduce((n, r) => n + r.fallbacks, 0);
        const rate = total ? fallbacks / total : null;
        const summary = h("p", { class: "summary", ...data({ rate, fallbacks, classifications: total }) },
          `Overall ${fmtPct(rate)}: ${fmtInt(fallbacks)} of ${fmtInt(total)} classifications went to the fallback.`);
        const byDay = new Map(rows.map((r) => [r.day, r]));
        const svg = columnChart({
          width,
          categories: rows.map((r) => r.day),
          series: [{ key: "rate", color: FALLBACK_COLOR }],
          values(day) {
            const r = byDay.get(day);
            return {
              value: r.fallback_rate || 0,
              attrs: data({ day, value: r.fallback_rate, fallbacks: r.fallbacks, classifications: r.classifications }),
              title: `${day}: ${fmtPct(r.fallback_rate)} (${r.fallbacks} of ${r.classifications})`,
            };
          },
          label: `Fallback rate per day; overall ${fmtPct(rate)}`,
          yFormat: (v) => `${Math.round(v * 100)}%`,
          yMax: 1,
          xFormat: (day) => day.slice(5),
        });
        return [summary, svg];
      },
    },

    "chart-confidence": {
      queries: ["confidence", "threshold"],
      render([result, thresholdResult], width) {
        const rows = objects(result);
        const threshold = thresholdResult && thresholdResult.rows.length
          ? thresholdResult.rows[0][0] : null;
        if (!rows.length) return [empty()];
        const byBucket = new Map(rows.map((r) => [r.bucket, r]));
        const buckets = [...Array(10).keys()];
        const name = (b) => `${(b / 10).toFixed(1)}–${((b + 1) / 10).toFixed(1)}`;
        const SERIES_TEXT = {
          routed: "routed to a workflow", fallbacks: "to the fallback", clarified: "asked to clarify",
        };
        const svg = columnChart({
          width,
          categories: buckets,
          series: [
            { key: "routed", color: ROUTED_COLOR },
            { key: "fallbacks", color: FALLBACK_COLOR },
            { key: "clarified", color: CLARIFY_COLOR },
          ],
          values(bucket, key) {
            const r = byBucket.get(bucket);
            if (!r) return null;
            return {
              value: r[key],
              attrs: data({ bucket, series: key, value: r[key] }),
              title: `confidence ${name(bucket)}: ${r[key]} ${SERIES_TEXT[key]}`,
            };
          },
          label: "Classifications by confidence, in tenths" +
            (threshold === null ? "" : `; threshold ${fmtConf(threshold)}`),
          yFormat: fmtInt,
          xFormat: (b) => (b / 10).toFixed(1),
          marker: threshold === null ? null : {
            at: threshold * 10, label: `threshold ${fmtConf(threshold)}`,
            attrs: data({ threshold }),
          },
        });
        return [svg, legend([["routed to a workflow", ROUTED_COLOR], ["fallback", FALLBACK_COLOR],
          ["asked to clarify", CLARIFY_COLOR]]),
          threshold === null ? null : h("p", { class: "hint" },
            `Dashed line: the threshold (${fmtConf(threshold)}). Below it no workflow starts ` +
            "and the fallback runs (unless two close candidates get a clarifying question).")];
      },
    },

    "chart-latency": {
      queries: ["latency"],
      render([result], width) {
        const rows = objects(result);
        if (!rows.length || !rows.some((r) => r.responses > 0)) return [empty()];
        const bars = [];
        for (const r of rows) {
          for (const [measure, value] of [["p50", r.p50_seconds], ["p95", r.p95_seconds]]) {
            bars.push({
              label: `${r.channel} ${measure}`,
              value: value || 0,
              text: `${fmtSeconds(value)} (${fmtInt(r.responses)})`,
              color: measure === "p50" ? ROUTED_COLOR : "#56B4E9",
              attrs: data({ channel: r.channel, measure, value, responses: r.responses }),
            });
          }
        }
        return [barList({ width, rows: bars,
          label: "First-response latency, p50 and p95 seconds per channel" })];
      },
    },

    "chart-funnel": {
      queries: ["funnel", "fallbackRuns"],
      render([result, fallbackResult], width) {
        const rows = objects(result);
        if (!rows.length) return [empty()];
        const workflows = [...new Set(rows.map((r) => r.workflow))];
        const ends = fallbackResult ? objects(fallbackResult)[0] : null;
        const runs = (n) => `${fmtInt(n)} run${n === 1 ? "" : "s"}`;
        return workflows.map((workflow) => {
          const states = rows.filter((r) => r.workflow === workflow);
          const { started, completed } = states[0];
          let text = `${workflow}: ${runs(started)}, ${fmtInt(completed)} completed ` +
            `(${fmtPct(started ? completed / started : null)})`;
          if (workflow === "fallback" && ends) {
            // The fallback has no goal to complete: say where its runs went instead.
            const others = Math.max(0, ends.runs - ends.handed_off - ends.went_on - ends.open);
            text = `fallback (messages no workflow was sure about): ${runs(ends.runs)}: ` +
              `${fmtInt(ends.handed_off)} handed to a person, ${fmtInt(ends.went_on)} went on ` +
              `to a workflow, ${fmtInt(others)} ended with the bot, ${fmtInt(ends.open)} still open`;
          }
          const heading = h("h3", { ...data({ workflow, started, completed }) }, text);
          const chart = barList({
            width,
            rows: states.map((r) => ({
              label: r.state,
              value: r.runs,
              text: `${fmtInt(r.runs)} (${fmtPct(started ? r.runs / started : null)})`,
              attrs: data({ workflow, state: r.state, value: r.runs }),
            })),
            max: Math.max(started, ...states.map((r) => r.runs)),
            label: `Funnel of ${workflow}: ${states.map((r) => `${r.state} ${r.runs}`).join(", ")}`,
          });
          return h("div", { class: "funnel", ...data({ workflow }) }, heading, chart);
        });
      },
    },
  };

  // ---------------------------------------------------------------- refreshing
  let generation = 0;
  const $ = (id) => document.getElementById(id);

  function setStatus(text) { $("status").textContent = text; }

  function askForToken(error) {
    $("token-note").textContent = error.status === 403
      ? error.message
      : "This hub needs a SQL token: enter it above (it is kept for this tab only).";
    $("token-input").focus();
  }

  function updateChannels(result) {
    allChannels = result.rows.map((row) => row[0]);
    const select = $("filter-channel");
    const chosen = filters.channel;
    const options = [h("option", { value: "" }, "All channels"),
      ...allChannels.map((c) => h("option", { value: c }, c))];
    if (chosen && !allChannels.includes(chosen)) options.push(h("option", { value: chosen }, chosen));
    select.replaceChildren(...options);
    select.value = chosen;
  }

  function updateTiles(results) {
    const [totals, fallback, latency] = results;
    const t = totals ? objects(totals)[0] : null;
    $("tile-messages").textContent = t ? fmtInt(t.messages) : "–";
    $("tile-conversations").textContent = t ? fmtInt(t.conversations) : "–";
    $("tile-users").textContent = t ? fmtInt(t.active_users) : "–";
    let rate = null;
    if (fallback) {
      const rows = objects(fallback);
      const total = rows.reduce((n, r) => n + r.classifications, 0);
      rate = total ? rows.reduce((n, r) => n + r.fallbacks, 0) / total : null;
    }
    $("tile-fallback").textContent = fmtPct(rate);
    const all = latency ? objects(latency).find((r) => r.channel === "(all)") : null;
    $("tile-latency").textContent = all && all.responses
      ? `${fmtSeconds(all.p50_seconds)} / ${fmtSeconds(all.p95_seconds)}` : "–";
  }

  // Run every query of the page (in parallel) and redraw. A refresh that a newer one has
  // overtaken draws nothing, so quick filter changes never leave older numbers behind.
  async function refresh() {
    const mine = ++generation;
    document.body.dataset.state = "loading";
    setStatus("Loading…");
    const names = ["channels", "totals", ...new Set(Object.values(CHARTS).flatMap((c) => c.queries))];
    const texts = Object.fromEntries(names.map((name) => [name, QUERIES[name]()]));
    const settled = await Promise.allSettled(names.map((name) => runSql(texts[name], 10000)));
    if (mine !== generation) return;
    const results = {};
    const errors = {};
    names.forEach((name, i) => {
      if (settled[i].status === "fulfilled") results[name] = settled[i].value;
      else errors[name] = settled[i].reason;
    });
    if (results.channels) updateChannels(results.channels);
    updateTiles([results.totals, results.fallback, results.latency]);
    for (const [id, chart] of Object.entries(CHARTS)) {
      const failed = chart.queries.map((q) => errors[q]).find(Boolean);
      let content;
      if (failed) {
        content = [failure(failed)];
      } else {
        try {
          // Draw at the box's own width, so one SVG unit is one pixel and text keeps
          // its size in narrow and wide cards alike.
          const width = Math.max(320, Math.round(chartBox(id).clientWidth) || 640);
          content = chart.render(chart.queries.map((q) => results[q]), width);
        } catch (error) {  // a drawing bug must not blank the rest of the page
          content = [failure(error.message)];
        }
      }
      show(id, content, details(chart.queries.map((q) => [texts[q], results[q]])));
    }
    const problems = Object.values(errors);
    const authProblem = problems.find((e) => e instanceof SqlError && e.needsToken);
    if (authProblem) askForToken(authProblem);
    else $("token-note").textContent = token() ? "Using the token kept for this tab." : "";
    setStatus(problems.length
      ? `${problems.length} of ${names.length} queries failed: ${problems[0]}`
      : `Updated ${new Date().toISOString().slice(11, 19)} UTC.`);
    document.body.dataset.state = problems.length ? "error" : "ready";
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes) + 1);
    refreshConversations();
  }

  // ---------------------------------------------------------------- conversations
  const OUTCOMES = ["open", "completed", "cancelled", "handed_off", "failed", "expired"];
  let convGeneration = 0;

  function utc(ts) {
    // DuckDB timestamps come as "YYYY-MM-DD HH:MM:SS[.ffffff]" (UTC, like the filters).
    return ts === null || ts === undefined ? "–" : String(ts).slice(0, 19).replace("T", " ");
  }

  function updateWorkflows(result) {
    const select = $("conv-workflow");
    const chosen = convFilters.workflow;
    const names = result.rows.map((row) => row[0]);
    if (chosen && !names.includes(chosen)) names.push(chosen);
    select.replaceChildren(h("option", { value: "" }, "All workflows"),
      ...names.map((w) => h("option", { value: w }, w)));
    select.value = chosen;
  }

  async function refreshConversations() {
    const mine = ++convGeneration;
    const sql = CONVERSATION_QUERIES.conversations();
    $("conv-status").textContent = "Loading…";
    const [workflows, list] = await Promise.allSettled([
      runSql(CONVERSATION_QUERIES.workflows(), 1000), runSql(sql, 200)]);
    if (mine !== convGeneration) return;
    if (workflows.status === "fulfilled") updateWorkflows(workflows.value);
    const box = $("conv-list");
    if (list.status === "rejected") {
      box.replaceChildren(failure(list.reason));
      $("conv-status").textContent = "";
    } else {
      const rows = objects(list.value);
      $("conv-status").textContent = `${fmtInt(rows.length)} conversation${rows.length === 1 ? "" : "s"}` +
        (rows.length === 200 ? " (the newest 200)" : "") + ", newest first.";
      box.replaceChildren(rows.length ? conversationTable(rows) : empty());
    }
    $("conv-sql").replaceChildren(h("code", {}, sql));
    document.body.dataset.conversations = String(Number(document.body.dataset.conversations || 0) + 1);
  }

  function conversationTable(rows) {
    return h("table", { class: "conversations" },
      h("thead", {}, h("tr", {}, ["Conversation", "Channel", "User", "Last activity (UTC)",
        "Messages", "Workflows", "Outcome"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows.map((r) => {
        const open = h("button", { type: "button", class: "link", "aria-label": `Open the transcript of ${r.conversation}` },
          r.conversation);
        open.addEventListener("click", () => openTranscript(r.conversation));
        return h("tr", data({ conversation: r.conversation, outcome: r.outcome, channel: r.channel }),
          h("td", {}, open), h("td", {}, r.channel || "–"), h("td", {}, r.user_id || "–"),
          h("td", {}, utc(r.last_ts)), h("td", { class: "num" }, fmtInt(r.messages)),
          h("td", {}, (r.workflows || []).join(", ") || "–"),
          h("td", {}, h("span", { class: `outcome ${r.outcome}` }, r.outcome)));
      })));
  }

  // ---------------------------------------------------------------- one transcript
  const TRANSCRIPT_REFRESH_MS = 3000;
  let transcriptOf = null;
  let transcriptTimer = 0;
  let transcriptGeneration = 0;
  const SOURCE_TEXT = {
    message: "message", classification: "classified", workflow: "workflow", input: "input",
    channel: "channel",
  };

  function openTranscript(id) {
    transcriptOf = id;
    $("transcript").hidden = false;
    $("h-transcript").textContent = `Conversation ${id}`;
    $("timeline").replaceChildren();
    if (window.location.hash !== `#conversation=${id}`) {
      window.history.replaceState(null, "", `#conversation=${encodeURIComponent(id)}`);
    }
    loadTranscript(true);
    $("transcript").scrollIntoView({ block: "start" });
    $("transcript-close").focus();
  }

  function closeTranscript() {
    transcriptOf = null;
    clearTimeout(transcriptTimer);
    $("transcript").hidden = true;
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
  }

  async function loadTranscript(first) {
    clearTimeout(transcriptTimer);
    const id = transcriptOf;
    if (id === null) return;
    const mine = ++transcriptGeneration;
    const sql = CONVERSATION_QUERIES.transcript(id);
    let result = null;
    let problem = null;
    if (first || document.visibilityState !== "hidden") {
      try { result = await runSql(sql, 5000); } catch (error) { problem = error; }
    }
    if (mine !== transcriptGeneration || id !== transcriptOf) return;
    if (problem) {
      $("transcript-status").textContent = `Could not load: ${problem}`;
    } else if (result) {
      drawTimeline(objects(result));
      $("transcript-status").textContent =
        `${fmtInt(result.rows.length)} records · updated ${new Date().toISOString().slice(11, 19)} UTC · ` +
        "refreshes every 3 s while open";
      $("transcript-sql").replaceChildren(h("code", {}, sql));
      $("transcript").dataset.loads = String(Number($("transcript").dataset.loads || 0) + 1);
    }
    transcriptTimer = setTimeout(() => loadTranscript(false), TRANSCRIPT_REFRESH_MS);
  }

  function drawTimeline(rows) {
    const list = $("timeline");
    const stick = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.replaceChildren(...rows.map((r) => {
      const side = r.source === "message" ? r.kind : "event";
      return h("li", { class: `${r.source} ${side}`, ...data({ source: r.source, kind: r.kind }) },
        h("span", { class: "when" }, utc(r.ts).slice(11)),
        h("span", { class: "what" }, `${SOURCE_TEXT[r.source] || r.source} · ${r.kind}`),
        h("span", { class: "who" }, r.who || ""),
        r.text === null || r.text === undefined ? null : h("span", { class: "text" }, r.text),
        r.detail ? h("span", { class: "detail" }, r.detail) : null);
    }));
    if (stick) list.scrollTop = list.scrollHeight;
  }

  // ---------------------------------------------------------------- the SQL box
  async function runBox() {
    const sql = $("sql-input").value;
    const maxRows = Number.parseInt($("sql-max-rows").value, 10) || undefined;
    const error = $("sql-error");
    const result = $("sql-result");
    error.hidden = true;
    error.replaceChildren();
    $("sql-status").textContent = "Running…";
    $("sql-run").disabled = true;
    try {
      const body = await runSql(sql, maxRows);
      result.replaceChildren(resultTable(body));
      const n = body.rows.length;
      $("sql-status").textContent = `${fmtInt(n)} row${n === 1 ? "" : "s"}` +
        (body.truncated ? ", truncated at the row limit" : "");
    } catch (failure) {
      result.replaceChildren();
      $("sql-status").textContent = "";
      error.append(h("strong", {}, failure.code || "error"), " ", h("span", { class: "message" }, failure.message));
      error.dataset.code = failure.code || "error";
      error.hidden = false;
      if (failure instanceof SqlError && failure.needsToken) askForToken(failure);
    } finally {
      $("sql-run").disabled = false;
    }
  }

  // ---------------------------------------------------------------- wiring
  function readFilters() {
    filters.channel = $("filter-channel").value;
    filters.from = $("filter-from").value;
    filters.to = $("filter-to").value;
  }

  function init() {
    adoptUrlToken();
    $("filters").addEventListener("submit", (event) => {
      event.preventDefault();
      readFilters();
      refresh();
    });
    $("filters").addEventListener("reset", () => {
      // After the browser has cleared the fields.
      setTimeout(() => { readFilters(); refresh(); }, 0);
    });
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      setToken($("token-input").value.trim());
      $("token-input").value = "";
      refresh();
    });
    $("conv-filters").addEventListener("submit", (event) => {
      event.preventDefault();
      convFilters.workflow = $("conv-workflow").value;
      convFilters.outcome = $("conv-outcome").value;
      convFilters.text = $("conv-text").value.trim();
      refreshConversations();
    });
    $("conv-outcome").replaceChildren(h("option", { value: "" }, "Any outcome"),
      ...OUTCOMES.map((o) => h("option", { value: o }, o)));
    $("transcript-close").addEventListener("click", closeTranscript);
    const linked = /^#conversation=([A-Za-z0-9_-]{1,128})$/.exec(window.location.hash);
    if (linked) openTranscript(linked[1]);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && transcriptOf !== null) loadTranscript(false);
    });
    $("sql-form").addEventListener("submit", (event) => {
      event.preventDefault();
      runBox();
    });
    $("sql-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        $("sql-form").requestSubmit();
      }
    });
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
