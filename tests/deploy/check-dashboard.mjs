// Checks deploy/grafana/attnserve.json: that it is a well-formed Grafana
// dashboard (required fields, unique panel ids, a sane 24-column grid layout,
// templated datasource) that shows what operators need, and writes every PromQL
// expression in it, template variables substituted, to a recording-rules file
// for `promtool check rules` to parse.
//
// Usage: node check-dashboard.mjs DASHBOARD.json OUT_RULES.yml
import { readFileSync, writeFileSync } from "node:fs";
import { stringify } from "yaml";

const [dashboardPath, rulesPath] = process.argv.slice(2);
if (!dashboardPath || !rulesPath) {
  console.error("usage: node check-dashboard.mjs DASHBOARD.json OUT_RULES.yml");
  process.exit(2);
}

const problems = [];
const fail = (msg) => problems.push(msg);

let dash;
try {
  dash = JSON.parse(readFileSync(dashboardPath, "utf8"));
} catch (e) {
  console.error(`${dashboardPath}: not JSON: ${e.message}`);
  process.exit(1);
}

for (const [field, type] of [["title", "string"], ["uid", "string"], ["schemaVersion", "number"],
                             ["panels", "array"], ["templating", "object"], ["time", "object"]]) {
  const v = dash[field];
  const ok = type === "array" ? Array.isArray(v) : typeof v === type && v !== null;
  if (!ok) fail(`dashboard.${field} must be a ${type}`);
}
if (typeof dash.uid === "string" && !/^[A-Za-z0-9_-]{1,40}$/.test(dash.uid)) {
  fail(`dashboard.uid ${JSON.stringify(dash.uid)}: Grafana uids are at most 40 of [A-Za-z0-9_-]`);
}
if (dash.id !== undefined && dash.id !== null) {
  fail("dashboard.id must be absent or null so that importing creates the dashboard");
}

// Template variables: a Prometheus datasource variable plus job and instance.
const vars = new Map();
for (const v of dash.templating?.list ?? []) {
  if (typeof v.name !== "string" || typeof v.type !== "string") fail(`template variable without name/type: ${JSON.stringify(v)}`);
  if (vars.has(v.name)) fail(`template variable ${v.name} defined twice`);
  vars.set(v.name, v);
}
const dsVar = vars.get("datasource");
if (!dsVar || dsVar.type !== "datasource" || dsVar.query !== "prometheus") {
  fail('templating needs a variable "datasource" of type datasource with query "prometheus"');
}
for (const name of ["job", "instance"]) {
  const v = vars.get(name);
  if (!v || v.type !== "query") fail(`templating needs a query variable "${name}"`);
}

// Values each variable takes when the expressions are checked; Grafana's
// built-ins included. A variable not listed here and not defined is an error.
const substitutes = {
  __rate_interval: "1m", __interval: "1m", __range: "1h", __range_s: "3600", __interval_ms: "60000",
};
for (const [name, v] of vars) {
  if (v.type === "datasource") continue;
  substitutes[name] = v.includeAll ? (v.allValue ?? ".*") : "attnserve";
}
function substitute(expr, where) {
  return expr.replace(/\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]/g, (m, a, b, c) => {
    const name = a ?? b ?? c;
    if (!(name in substitutes)) {
      fail(`${where}: expression uses undefined variable $${name}`);
      return m;
    }
    return substitutes[name];
  });
}

const rules = [];
// Variable queries: label_values(SELECTOR, label) must have a parseable selector.
for (const [name, v] of vars) {
  if (v.type !== "query") continue;
  const q = typeof v.query === "string" ? v.query : v.query?.query;
  if (typeof q !== "string") { fail(`variable ${name}: no query`); continue; }
  const m = /^label_values\((.*),\s*(\w+)\)$/.exec(q.trim());
  if (!m) { fail(`variable ${name}: expected label_values(SELECTOR, LABEL), got ${q}`); continue; }
  rules.push({ record: `dashboard:variable_${name}`, expr: substitute(m[1], `variable ${name}`) });
}

// Panels, including those nested in collapsed rows.
const allPanels = [];
for (const p of dash.panels ?? []) {
  allPanels.push(p);
  for (const inner of p.panels ?? []) allPanels.push(inner);
}
const ids = new Set();
const exprs = [];
const cells = new Map(); // "x,y" -> panel id, to find overlapping panels
for (const p of allPanels) {
  const where = `panel ${JSON.stringify(p.title)} (id ${p.id})`;
  if (!Number.isInteger(p.id) || p.id <= 0) fail(`${where}: id must be a positive integer`);
  if (ids.has(p.id)) fail(`${where}: duplicate panel id ${p.id}`);
  ids.add(p.id);
  if (typeof p.type !== "string" || typeof p.title !== "string" || p.title === "") fail(`${where}: needs type and title`);
  const g = p.gridPos;
  if (!g || ![g.x, g.y, g.w, g.h].every(Number.isInteger)) {
    fail(`${where}: gridPos needs integer x, y, w, h`);
  } else {
    if (g.x < 0 || g.y < 0 || g.w < 1 || g.h < 1 || g.x + g.w > 24) fail(`${where}: gridPos ${JSON.stringify(g)} outside the 24-column grid`);
    for (let x = g.x; x < g.x + g.w; x++) {
      for (let y = g.y; y < g.y + g.h; y++) {
        const key = `${x},${y}`;
        if (cells.has(key)) fail(`${where}: overlaps panel id ${cells.get(key)} at ${key}`);
        cells.set(key, p.id);
      }
    }
  }
  if (p.type === "row") {
    if (p.targets?.length) fail(`${where}: a row has no queries`);
    continue;
  }
  if (p.datasource?.uid !== "${datasource}") fail(`${where}: datasource must be the templated \${datasource}`);
  if (!Array.isArray(p.targets) || p.targets.length === 0) { fail(`${where}: no targets`); continue; }
  const refIds = new Set();
  for (const t of p.targets) {
    if (refIds.has(t.refId)) fail(`${where}: duplicate refId ${t.refId}`);
    refIds.add(t.refId);
    if (typeof t.expr !== "string" || t.expr.trim() === "") { fail(`${where}: target ${t.refId} has no expr`); continue; }
    exprs.push(t.expr);
    rules.push({ record: `dashboard:panel_${p.id}_${t.refId}`, expr: substitute(t.expr, `${where} target ${t.refId}`) });
  }
}

// What the dashboard must show (issue: requests by code, latency quantiles,
// queue depth, batch size, GFLOP/s, RSS, KV cache, device memory, sessions;
// issue "attention you can look at": the entropy heatmap).
const all = exprs.join("\n");
const required = [
  [/sum by \(code\) \(rate\(attnserve_requests_total/, "requests by code"],
  [/histogram_quantile\(0\.5, [^\n]*attnserve_request_duration_seconds_bucket/, "latency p50"],
  [/histogram_quantile\(0\.9, [^\n]*attnserve_request_duration_seconds_bucket/, "latency p90"],
  [/histogram_quantile\(0\.99, [^\n]*attnserve_request_duration_seconds_bucket/, "latency p99"],
  [/attnserve_queue_depth/, "queue depth"],
  [/attnserve_batch_size_(bucket|sum)/, "batch size"],
  [/rate\(attnserve_flops_total[^\n]*\/ 1e9/, "achieved GFLOP/s"],
  [/process_resident_memory_bytes/, "RSS"],
  [/attnserve_kv_cache_bytes/, "KV cache"],
  [/attnserve_device_memory_bytes/, "device memory"],
  [/attnserve_sessions_active/, "sessions"],
  [/sum by \(le\) \(rate\(attnserve_attention_entropy_nats_bucket/, "the attention entropy heatmap"],
];
for (const [re, what] of required) if (!re.test(all)) fail(`no panel shows ${what} (${re})`);

writeFileSync(rulesPath, stringify({ groups: [{ name: "dashboard-expressions", rules }] }));

if (problems.length) {
  for (const p of problems) console.error(`${dashboardPath}: ${p}`);
  process.exit(1);
}
console.log(`${dashboardPath}: ${allPanels.length} panels, ${rules.length} expressions written to ${rulesPath}`);
