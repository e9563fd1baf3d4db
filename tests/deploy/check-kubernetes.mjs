// Validates one rendered kustomize overlay of attnserve: every object against
// the Kubernetes and Prometheus Operator schemas (kubernetes-models and
// @kubernetes-models/prometheus-operator validate on construction), then the
// properties the deployment relies on: non-root and read-only pods with
// resources and gRPC probes, a grace period above the drain, flags that all come
// from the ConfigMap, Services/HPA/PDB/ServiceMonitor that select the pods, the
// PrometheusRule equal to deploy/prometheus/attnserve-rules.yml, and the
// overlay's own settings (CPU, or GPU with nvidia.com/gpu and the CUDA image).
//
// Usage: node check-kubernetes.mjs cpu|gpu RENDERED.yaml RULES.yml
import { readFileSync } from "node:fs";
import { isDeepStrictEqual } from "node:util";
import { parse, parseAllDocuments } from "yaml";

const [overlay, renderedPath, rulesPath] = process.argv.slice(2);
if (!["cpu", "gpu"].includes(overlay) || !renderedPath || !rulesPath) {
  console.error("usage: node check-kubernetes.mjs cpu|gpu RENDERED.yaml RULES.yml");
  process.exit(2);
}
const problems = [];
const fail = (msg) => problems.push(`${overlay}: ${msg}`);

const docs = parseAllDocuments(readFileSync(renderedPath, "utf8"));
const objects = [];
for (const doc of docs) {
  if (doc.errors.length) { fail(`YAML error: ${doc.errors[0].message}`); continue; }
  const obj = doc.toJS();
  if (obj) objects.push(obj);
}

// Schema validation.
const modules = {
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};
for (const obj of objects) {
  const what = `${obj.kind}/${obj.metadata?.name}`;
  const base = modules[obj.apiVersion] ?? `kubernetes-models/${obj.apiVersion}`;
  let Model;
  try {
    Model = (await import(`${base}/${obj.kind}`))[obj.kind];
  } catch {
    fail(`${what}: no schema for ${obj.apiVersion} ${obj.kind}`);
    continue;
  }
  try {
    new Model(obj).validate();
  } catch (e) {
    fail(`${what} does not match the ${obj.apiVersion} ${obj.kind} schema: ${e.message}`);
  }
}

const byKind = (kind) => objects.filter((o) => o.kind === kind);
const one = (kind) => {
  const found = byKind(kind);
  if (found.length !== 1) fail(`expected one ${kind}, found ${found.length}`);
  return found[0];
};
const matches = (selector, labels) =>
  selector && Object.keys(selector).length > 0 &&
  Object.entries(selector).every(([k, v]) => labels?.[k] === v);
const cpuCores = (q) => (typeof q === "number" ? q : /m$/.test(q) ? Number(q.slice(0, -1)) / 1000 : Number(q));

const deployment = one("Deployment");
const configMap = one("ConfigMap");
const hpa = one("HorizontalPodAutoscaler");
const pdb = one("PodDisruptionBudget");
const serviceMonitor = one("ServiceMonitor");
const rule = one("PrometheusRule");
const services = byKind("Service");

if (deployment && configMap) {
  const pod = deployment.spec.template.spec;
  const podLabels = deployment.spec.template.metadata.labels;
  if (!matches(deployment.spec.selector.matchLabels, podLabels)) fail("Deployment selector does not match its pods");
  if (pod.securityContext?.runAsNonRoot !== true || !(pod.securityContext?.runAsUser > 0)) {
    fail("pod must set runAsNonRoot and a non-zero runAsUser");
  }
  const c = pod.containers.find((x) => x.name === "attnserve");
  if (!c) fail("no container named attnserve");
  else {
    const sc = c.securityContext ?? {};
    if (sc.readOnlyRootFilesystem !== true) fail("container root filesystem must be read-only");
    if (sc.allowPrivilegeEscalation !== false) fail("container must not allow privilege escalation");
    if (!sc.capabilities?.drop?.includes("ALL")) fail("container must drop all capabilities");
    for (const kind of ["requests", "limits"]) {
      for (const r of ["cpu", "memory"]) if (!c.resources?.[kind]?.[r]) fail(`container has no ${kind}.${r}`);
    }
    const grpcPort = c.ports?.find((p) => p.name === "grpc")?.containerPort;
    if (grpcPort !== 50051) fail(`container port grpc is ${grpcPort}, expected 50051`);
    if (c.ports?.find((p) => p.name === "metrics")?.containerPort !== 9464) fail("container port metrics must be 9464");
    for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
      if (c[probe]?.grpc?.port !== grpcPort) fail(`${probe} must be a gRPC health probe on port ${grpcPort}`);
    }

    // Flags: each $(VAR) in args is a key of the ConfigMap the container imports, and each key is used.
    const refs = (c.envFrom ?? []).map((e) => e.configMapRef?.name);
    if (!refs.includes(configMap.metadata.name)) {
      fail(`container does not import ConfigMap ${configMap.metadata.name} (envFrom: ${refs})`);
    }
    const used = new Set();
    for (const arg of c.args ?? []) {
      if (!arg.startsWith("--")) fail(`argument ${arg} is not a --flag`);
      for (const m of arg.matchAll(/\$\((\w+)\)/g)) {
        used.add(m[1]);
        if (!(m[1] in configMap.data)) fail(`argument ${arg} uses $(${m[1]}), which the ConfigMap lacks`);
      }
    }
    for (const key of Object.keys(configMap.data)) if (!used.has(key)) fail(`ConfigMap key ${key} feeds no flag`);
    for (const flag of ["listen", "metrics_listen", "backend", "drain_timeout_s"]) {
      if (!(c.args ?? []).some((a) => a.startsWith(`--${flag}=`))) fail(`no --${flag} argument`);
    }

    // Shutdown: preStop pause + drain must end before the kill.
    const drain = Number(configMap.data.ATTNSERVE_DRAIN_TIMEOUT_S);
    const preStop = c.lifecycle?.preStop?.exec?.command;
    const pause = preStop && /sleep$/.test(preStop[0]) ? Number(preStop[1]) : 0;
    const grace = pod.terminationGracePeriodSeconds;
    if (!(drain > 0)) fail("ATTNSERVE_DRAIN_TIMEOUT_S must be a positive number of seconds");
    if (!(grace > pause + drain)) {
      fail(`terminationGracePeriodSeconds ${grace} must exceed preStop ${pause} s + drain timeout ${drain} s`);
    }
    const threads = Number(configMap.data.ATTNSERVE_THREADS);
    if (!(threads >= 1 && threads <= cpuCores(c.resources.limits.cpu))) {
      fail(`ATTNSERVE_THREADS ${threads} must be between 1 and the CPU limit ${c.resources.limits.cpu}`);
    }

    // Overlay specifics.
    const gpus = Number(c.resources?.limits?.["nvidia.com/gpu"] ?? 0);
    if (overlay === "gpu") {
      if (gpus < 1) fail("gpu overlay must limit nvidia.com/gpu");
      if (configMap.data.ATTNSERVE_BACKEND !== "cuda") fail("gpu overlay must set --backend=cuda");
      if (!/cuda/.test(c.image)) fail(`gpu overlay image ${c.image} is not the CUDA image`);
    } else {
      if (gpus !== 0) fail("cpu overlay must not request GPUs");
      if (configMap.data.ATTNSERVE_BACKEND !== "cpu") fail("cpu overlay must set --backend=cpu");
      if (/cuda/.test(c.image)) fail(`cpu overlay image ${c.image} is the CUDA image`);
    }
  }

  // Services: a ClusterIP and a headless one, both routing to the grpc port of the pods.
  const clusterIp = services.filter((s) => s.spec.clusterIP !== "None");
  const headless = services.filter((s) => s.spec.clusterIP === "None");
  if (clusterIp.length !== 1 || headless.length !== 1) {
    fail(`expected one ClusterIP and one headless Service, found ${clusterIp.length} and ${headless.length}`);
  }
  for (const s of services) {
    if (!matches(s.spec.selector, podLabels)) fail(`Service ${s.metadata.name} does not select the pods`);
    const grpc = s.spec.ports.find((p) => p.name === "grpc");
    if (!grpc || grpc.port !== 50051 || grpc.targetPort !== "grpc") fail(`Service ${s.metadata.name} must expose grpc 50051`);
  }

  // HPA and PDB.
  const target = hpa?.spec.scaleTargetRef;
  if (target?.kind !== "Deployment" || target?.name !== deployment.metadata.name) {
    fail(`HPA targets ${target?.kind}/${target?.name}, not the Deployment`);
  }
  if (!(hpa?.spec.minReplicas >= 1 && hpa.spec.maxReplicas >= hpa.spec.minReplicas)) fail("HPA replica bounds are wrong");
  if (deployment.spec.replicas !== undefined) fail("Deployment sets replicas, which fights the HPA");
  if (!matches(pdb?.spec.selector?.matchLabels, podLabels)) fail("PodDisruptionBudget does not select the pods");

  // ServiceMonitor: exactly one Service (each pod scraped once), on its metrics port.
  const scraped = services.filter((s) => matches(serviceMonitor?.spec.selector?.matchLabels, s.metadata.labels));
  if (scraped.length !== 1) fail(`ServiceMonitor selects ${scraped.length} Services, expected 1`);
  else {
    for (const ep of serviceMonitor.spec.endpoints) {
      if (!scraped[0].spec.ports.some((p) => p.name === ep.port)) fail(`ServiceMonitor port ${ep.port} is not on ${scraped[0].metadata.name}`);
    }
    if (!/^attnserve/.test(scraped[0].metadata.name)) fail("the scraped Service's name (the job label) must start with attnserve, as the rules expect");
  }
}

// PrometheusRule: the same groups as the rules file.
if (rule) {
  const groups = parse(readFileSync(rulesPath, "utf8")).groups;
  if (!isDeepStrictEqual(rule.spec.groups, groups)) fail(`PrometheusRule groups differ from ${rulesPath}`);
}

if (problems.length) {
  for (const p of problems) console.error(p);
  process.exit(1);
}
console.log(`${overlay}: ${objects.length} objects valid (${objects.map((o) => o.kind).join(", ")})`);
