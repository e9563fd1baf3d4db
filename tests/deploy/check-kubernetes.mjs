// Validates one rendered kustomize overlay of attnserve: every object against
// the Kubernetes and Prometheus Operator schemas (kubernetes-models and
// @kubernetes-models/prometheus-operator validate on construction), then the
// properties the deployment relies on: non-root and read-only pods with
// resources and gRPC probes, a grace period above the drain, flags that all come
// from the ConfigMap, Services/HPA/PDB/ServiceMonitor that select the pods, the
// PrometheusRule equal to deploy/prometheus/attnserve-rules.yml, and the
// overlay's own settings (CPU, or GPU with nvidia.com/gpu and the CUDA image,
// or sharded: a StatefulSet whose serviceName is a headless Service that the
// --peers=dns:...:50051 flag names, --replica_id from the pod name, the peer
// token mounted from a Secret, and the pod template of REFERENCE.yaml, the cpu
// overlay's rendering, apart from the peer additions).
//
// Usage: node check-kubernetes.mjs cpu|gpu RENDERED.yaml RULES.yml
//        node check-kubernetes.mjs sharded RENDERED.yaml RULES.yml REFERENCE.yaml
import { readFileSync } from "node:fs";
import { isDeepStrictEqual } from "node:util";
import { parse, parseAllDocuments } from "yaml";

const [overlay, renderedPath, rulesPath, referencePath] = process.argv.slice(2);
const sharded = overlay === "sharded";
if (!["cpu", "gpu", "sharded"].includes(overlay) || !renderedPath || !rulesPath || sharded !== !!referencePath) {
  console.error("usage: node check-kubernetes.mjs cpu|gpu RENDERED.yaml RULES.yml\n" +
                "       node check-kubernetes.mjs sharded RENDERED.yaml RULES.yml REFERENCE.yaml");
  process.exit(2);
}
const problems = [];
const fail = (msg) => problems.push(`${overlay}: ${msg}`);

const load = (path) => {
  const out = [];
  for (const doc of parseAllDocuments(readFileSync(path, "utf8"))) {
    if (doc.errors.length) { fail(`${path}: YAML error: ${doc.errors[0].message}`); continue; }
    const obj = doc.toJS();
    if (obj) out.push(obj);
  }
  return out;
};
const objects = load(renderedPath);

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

// The server's workload: the base's Deployment, or for sharded the StatefulSet
// it becomes (stable pod names, a fixed replica count and no autoscaler).
const workloadKind = sharded ? "StatefulSet" : "Deployment";
const otherKind = sharded ? "Deployment" : "StatefulSet";
if (byKind(otherKind).length) fail(`unexpected ${otherKind}: the server runs as a ${workloadKind}`);
const workload = one(workloadKind);
const configMap = one("ConfigMap");
const hpa = sharded ? undefined : one("HorizontalPodAutoscaler");
if (sharded && byKind("HorizontalPodAutoscaler").length) {
  fail("sharded overlay must not autoscale: a scale-down would drop the shards of the pods it removes");
}
const pdb = one("PodDisruptionBudget");
const serviceMonitor = one("ServiceMonitor");
const rule = one("PrometheusRule");
const services = byKind("Service");

if (workload && configMap) {
  const pod = workload.spec.template.spec;
  const podLabels = workload.spec.template.metadata.labels;
  if (!matches(workload.spec.selector.matchLabels, podLabels)) fail(`${workloadKind} selector does not match its pods`);
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

    // Flags: each $(VAR) in args is a key of the ConfigMap the container imports
    // (or a variable of the pod's own from the downward API), and each key is used.
    const refs = (c.envFrom ?? []).map((e) => e.configMapRef?.name);
    if (!refs.includes(configMap.metadata.name)) {
      fail(`container does not import ConfigMap ${configMap.metadata.name} (envFrom: ${refs})`);
    }
    const downward = Object.fromEntries(
      (c.env ?? []).filter((e) => e.valueFrom?.fieldRef?.fieldPath).map((e) => [e.name, e.valueFrom.fieldRef.fieldPath]));
    for (const e of c.env ?? []) {
      if (!(e.name in downward)) fail(`env ${e.name} is not from the downward API: server settings belong in the ConfigMap`);
      if (e.name in (configMap.data ?? {})) fail(`env ${e.name} shadows the ConfigMap key of the same name`);
    }
    const used = new Set();
    for (const arg of c.args ?? []) {
      if (!arg.startsWith("--")) fail(`argument ${arg} is not a --flag`);
      for (const m of arg.matchAll(/\$\((\w+)\)/g)) {
        used.add(m[1]);
        if (!(m[1] in configMap.data) && !(m[1] in downward)) {
          fail(`argument ${arg} uses $(${m[1]}), which neither the ConfigMap nor the pod's env has`);
        }
      }
    }
    for (const name of Object.keys(downward)) if (!used.has(name)) fail(`env ${name} feeds no flag`);
    const flags = {};
    for (const arg of c.args ?? []) {
      const m = /^--(\w+)=(.*)$/.exec(arg);
      if (m) {
        if (m[1] in flags) fail(`--${m[1]} is given twice`);
        flags[m[1]] = m[2];
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
      if (gpus !== 0) fail(`${overlay} overlay must not request GPUs`);
      if (configMap.data.ATTNSERVE_BACKEND !== "cpu") fail(`${overlay} overlay must set --backend=cpu`);
      if (/cuda/.test(c.image)) fail(`${overlay} overlay image ${c.image} is the CUDA image`);
    }

    if (sharded) checkSharded(workload, c, flags, downward);
    else for (const flag of ["peers", "replica_id", "peer_token_file"]) {
      if (flag in flags) fail(`--${flag} belongs to the sharded overlay`);
    }
  }

  // Services: a ClusterIP and a headless one (sharded: a second headless one for
  // the peers), all routing to the grpc port of the pods.
  const clusterIp = services.filter((s) => s.spec.clusterIP !== "None");
  const headless = services.filter((s) => s.spec.clusterIP === "None");
  const headlessExpected = sharded ? 2 : 1;
  if (clusterIp.length !== 1 || headless.length !== headlessExpected) {
    fail(`expected one ClusterIP and ${headlessExpected} headless Services, found ${clusterIp.length} and ${headless.length}`);
  }
  for (const s of services) {
    if (!matches(s.spec.selector, podLabels)) fail(`Service ${s.metadata.name} does not select the pods`);
    const grpc = s.spec.ports.find((p) => p.name === "grpc");
    if (!grpc || grpc.port !== 50051 || grpc.targetPort !== "grpc") fail(`Service ${s.metadata.name} must expose grpc 50051`);
  }

  // HPA (sharded: a fixed count instead) and PDB.
  if (sharded) {
    if (workload.spec.replicas !== 3) fail(`StatefulSet replicas is ${workload.spec.replicas}, expected 3`);
  } else {
    const target = hpa?.spec.scaleTargetRef;
    if (target?.kind !== "Deployment" || target?.name !== workload.metadata.name) {
      fail(`HPA targets ${target?.kind}/${target?.name}, not the Deployment`);
    }
    if (!(hpa?.spec.minReplicas >= 1 && hpa.spec.maxReplicas >= hpa.spec.minReplicas)) fail("HPA replica bounds are wrong");
    if (workload.spec.replicas !== undefined) fail("Deployment sets replicas, which fights the HPA");
  }
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

// The sharded overlay's StatefulSet: peers found through its headless
// serviceName, named by the pod, authenticated by a token from a Secret, and
// otherwise the pod template of the cpu overlay's Deployment.
function checkSharded(sts, c, flags, downward) {
  const pod = sts.spec.template.spec;
  if (sts.spec.podManagementPolicy !== "Parallel") fail(`podManagementPolicy is ${sts.spec.podManagementPolicy}, expected Parallel`);
  // The schemas allow unknown fields; the API server's strict validation does not.
  for (const field of ["strategy", "progressDeadlineSeconds", "paused"]) {
    if (field in sts.spec) fail(`StatefulSet spec keeps the Deployment field ${field}`);
  }

  // serviceName: a headless Service of this rendering that selects the pods and
  // lists ready pods only (a draining one must get no new shards).
  const name = sts.spec.serviceName;
  const svc = services.find((s) => s.metadata.name === name);
  if (!svc) fail(`serviceName ${name} is not a Service of the overlay`);
  else {
    if (svc.spec.clusterIP !== "None") fail(`serviceName ${name} is not headless (clusterIP: None)`);
    if (svc.spec.publishNotReadyAddresses !== false) fail(`Service ${name} must set publishNotReadyAddresses: false`);
    if (!matches(svc.spec.selector, sts.spec.template.metadata.labels)) fail(`Service ${name} does not select the StatefulSet's pods`);
    if (matches(serviceMonitor?.spec.selector?.matchLabels, svc.metadata.labels)) fail(`ServiceMonitor selects ${name}: pods would be scraped twice`);
  }

  // --peers=dns:SERVICE.NAMESPACE.svc.cluster.local:50051, the namespace from
  // the downward API (or the overlay's own namespace, when it sets one).
  const peers = flags.peers;
  const m = /^dns:([a-z0-9-]+)\.(\$\((\w+)\)|[a-z0-9-]+)\.svc\.cluster\.local:(\d+)$/.exec(peers ?? "");
  if (!m) fail(`--peers=${peers} is not dns:SERVICE.NAMESPACE.svc.cluster.local:PORT`);
  else {
    if (m[1] !== name) fail(`--peers resolves ${m[1]}, not the StatefulSet's serviceName ${name}`);
    if (m[4] !== "50051") fail(`--peers port is ${m[4]}, expected 50051 (the gRPC port)`);
    const ns = m[3] ? downward[m[3]] : m[2];
    if (m[3] ? ns !== "metadata.namespace" : ns !== sts.metadata.namespace) {
      fail(`--peers namespace ${m[2]} is not the pod's namespace (downward API metadata.namespace)`);
    }
  }

  // --replica_id: the pod's name (attnserve-0, ...).
  const id = /^\$\((\w+)\)$/.exec(flags.replica_id ?? "");
  if (!id || downward[id[1]] !== "metadata.name") fail(`--replica_id=${flags.replica_id} is not the pod name from the downward API`);

  // PartialAttend callers: "peer" (the default) must be one of them.
  if ("peer_callers" in flags && !flags.peer_callers.split(",").includes("peer")) fail(`--peer_callers=${flags.peer_callers} lacks peer`);

  // --peer_token_file: a file of a Secret volume, mounted read-only.
  const file = flags.peer_token_file;
  if (!file) fail("no --peer_token_file");
  else {
    const mount = (c.volumeMounts ?? []).find((vm) => file.startsWith(vm.mountPath.replace(/\/?$/, "/")));
    const volume = mount && (pod.volumes ?? []).find((v) => v.name === mount.name);
    if (!volume?.secret?.secretName) fail(`--peer_token_file ${file} is not in a mounted Secret`);
    else {
      const rel = file.slice(mount.mountPath.replace(/\/?$/, "/").length);
      const items = volume.secret.items;
      if (items ? !items.some((i) => i.path === rel) : !rel || rel.includes("/")) {
        fail(`--peer_token_file ${file}: Secret ${volume.secret.secretName} does not project ${rel}`);
      }
      if (mount.readOnly !== true) fail(`the peer token mount ${mount.mountPath} must be read-only`);
      if (volume.secret.optional) fail("the peer token Secret must not be optional (the server refuses to start without the file)");
    }
  }

  // The rest of the pod template is the base's: compare with the cpu overlay's Deployment.
  const reference = load(referencePath).find((o) => o.kind === "Deployment");
  if (!reference) { fail(`${referencePath} has no Deployment to compare with`); return; }
  const refPod = reference.spec.template.spec;
  const refC = refPod.containers.find((x) => x.name === "attnserve");
  const same = (what, a, b) => { if (!isDeepStrictEqual(a, b)) fail(`${what} differs from the base's`); };
  for (const field of ["startupProbe", "readinessProbe", "livenessProbe", "resources", "securityContext", "lifecycle", "image", "ports", "envFrom"]) {
    same(`container ${field}`, c[field], refC[field]);
  }
  same("container args (less the peer flags)",
       c.args.filter((a) => !/^--(peers|replica_id|peer_token_file|peer_callers)=/.test(a)), refC.args);
  for (const field of ["securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken",
                       "enableServiceLinks", "topologySpreadConstraints"]) {
    same(`pod ${field}`, pod[field], refPod[field]);
  }
  same("pod labels", sts.spec.template.metadata.labels, reference.spec.template.metadata.labels);
  for (const v of refPod.volumes ?? []) same(`volume ${v.name}`, (pod.volumes ?? []).find((x) => x.name === v.name), v);
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
