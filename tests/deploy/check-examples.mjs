// Validates the stand-alone manifests of deploy/kubernetes/examples: every
// object against the Kubernetes schema (kubernetes-models), and for a pod that
// runs attnserve with --allow_shared_memory, the shared-memory setup the
// README describes: one emptyDir of medium Memory with a sizeLimit, mounted at
// /dev/shm in every container, and the server listening on loopback only.
//
// Usage: node check-examples.mjs EXAMPLE.yaml...
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const problems = [];
for (const path of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(path, "utf8"))) {
    if (doc.errors.length) { problems.push(`${path}: YAML error: ${doc.errors[0].message}`); continue; }
    const obj = doc.toJS();
    if (!obj) continue;
    const what = `${path}: ${obj.kind}/${obj.metadata?.name}`;
    try {
      const Model = (await import(`kubernetes-models/${obj.apiVersion}/${obj.kind}`))[obj.kind];
      new Model(obj).validate();
    } catch (e) {
      problems.push(`${what} does not match the ${obj.apiVersion} ${obj.kind} schema: ${e.message}`);
      continue;
    }
    const spec = obj.kind === "Pod" ? obj.spec : obj.spec?.template?.spec;
    const server = spec?.containers?.find((c) => (c.args ?? []).includes("--allow_shared_memory"));
    if (!server) continue;
    const shm = (spec.volumes ?? []).find((v) => v.emptyDir?.medium === "Memory");
    if (!shm) { problems.push(`${what}: no emptyDir of medium Memory for /dev/shm`); continue; }
    if (!shm.emptyDir.sizeLimit) problems.push(`${what}: the shm emptyDir has no sizeLimit`);
    for (const c of spec.containers) {
      if (!(c.volumeMounts ?? []).some((m) => m.name === shm.name && m.mountPath === "/dev/shm")) {
        problems.push(`${what}: container ${c.name} does not mount ${shm.name} at /dev/shm`);
      }
    }
    if (!server.args.some((a) => a.startsWith("--listen=127.0.0.1:"))) {
      problems.push(`${what}: the shared-memory server should listen on loopback (--listen=127.0.0.1:PORT)`);
    }
  }
}
for (const p of problems) console.error(p);
console.log(`examples: ${problems.length === 0 ? "ok" : `${problems.length} problem(s)`}`);
process.exit(problems.length === 0 ? 0 : 1);
