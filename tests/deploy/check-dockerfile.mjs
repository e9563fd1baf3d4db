// Checks a Dockerfile of attnserve without a Docker engine: every file it COPYs
// from the build context exists and is not excluded by .dockerignore, the build
// stage installs through scripts/install-deps (what CI runs) and builds Release
// without tests, and the runtime stage runs attnserve as a non-root user with
// the two ports exposed and only runtime packages, each of which apt knows.
// With a build directory, the libraries the built binaries load must all come
// from packages the runtime stage installs.
//
// Usage: node check-dockerfile.mjs REPO_ROOT DOCKERFILE cpu|cuda [BUILD_DIR]
// Prints the runtime package list on its last line ("runtime packages: ...").
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";

const [root, dockerfileName, variant, buildDir] = process.argv.slice(2);
if (!root || !dockerfileName || !["cpu", "cuda"].includes(variant)) {
  console.error("usage: node check-dockerfile.mjs REPO_ROOT DOCKERFILE cpu|cuda [BUILD_DIR]");
  process.exit(2);
}
const problems = [];
const fail = (msg) => problems.push(msg);

// Instructions: comments dropped, continuation lines joined.
const text = readFileSync(join(root, dockerfileName), "utf8");
const instructions = [];
let pending = "";
for (const raw of text.split("\n")) {
  if (/^\s*#/.test(raw)) continue;
  const line = raw.replace(/\s+$/, "");
  if (line.endsWith("\\")) { pending += line.slice(0, -1) + " "; continue; }
  const full = (pending + line).trim();
  pending = "";
  if (!full) continue;
  const m = /^(\w+)\s+(.*)$/s.exec(full);
  if (!m) { fail(`cannot parse instruction: ${full}`); continue; }
  instructions.push({ op: m[1].toUpperCase(), args: m[2] });
}

// Global ARG defaults, for FROM ${...}.
const argDefaults = {};
const stages = [];
for (const ins of instructions) {
  if (ins.op === "ARG" && stages.length === 0) {
    const m = /^(\w+)=(.*)$/.exec(ins.args);
    if (m) argDefaults[m[1]] = m[2].replace(/^"(.*)"$/, "$1");
  } else if (ins.op === "FROM") {
    const m = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.args);
    const image = m[1].replace(/\$\{(\w+)\}/g, (_, n) => argDefaults[n] ?? `\${${n}}`);
    stages.push({ image, name: m[2] ?? String(stages.length), body: [] });
  } else if (stages.length) {
    stages.at(-1).body.push(ins);
  }
}
if (stages.length < 2) fail("expected a multi-stage build (build and runtime stages)");
const build = stages.find((s) => s.name === "build");
const runtime = stages.at(-1);
if (!build) fail('no stage named "build"');

// .dockerignore patterns as regular expressions over context-relative paths.
const ignore = existsSync(join(root, ".dockerignore"))
  ? readFileSync(join(root, ".dockerignore"), "utf8").split("\n").map((l) => l.trim())
      .filter((l) => l && !l.startsWith("#"))
  : (fail("no .dockerignore"), []);
const ignoreRes = ignore.map((p) => new RegExp("^" + p.replace(/^\//, "").replace(/[.+^$()|{}]/g, "\\$&")
  .replace(/\*\*\//g, "\u0000").replace(/\*\*/g, ".*").replace(/\*/g, "[^/]*").replace(/\?/g, "[^/]")
  .replace(/\u0000/g, "(?:.*/)?") + "(?:/.*)?$"));
const ignored = (path) => ignoreRes.some((re) => re.test(path));

// COPY/ADD from the context.
const copied = [];
for (const stage of stages) {
  for (const ins of stage.body) {
    if (ins.op === "ADD") fail(`ADD ${ins.args}: use COPY (ADD fetches URLs and unpacks archives)`);
    if (ins.op !== "COPY") continue;
    const words = ins.args.split(/\s+/);
    if (words.some((w) => w.startsWith("--from="))) continue;
    const paths = words.filter((w) => !w.startsWith("--"));
    for (const src of paths.slice(0, -1)) {
      const rel = src.replace(/^\.\//, "").replace(/\/$/, "");
      if (!existsSync(join(root, rel))) fail(`COPY ${src}: no such file in the build context`);
      else if (ignored(rel)) fail(`COPY ${src}: excluded by .dockerignore`);
      copied.push(rel);
    }
  }
}
for (const needed of ["scripts/install-deps", "CMakeLists.txt", "proto", "src", "wire", "server", "client"]) {
  if (!copied.includes(needed)) fail(`build context path ${needed} is not copied`);
}

// Build stage: Debian bookworm, install-deps, Release without tests.
if (build) {
  const runs = build.body.filter((i) => i.op === "RUN").map((i) => i.args).join("\n");
  if (!/^debian:bookworm(\W|$)/.test(build.image)) fail(`build stage image ${build.image}: expected debian:bookworm`);
  if (!/(^|\s)\/src\/scripts\/install-deps\b/.test(runs)) fail("build stage does not run scripts/install-deps");
  if (/apt-get install/.test(runs)) fail("build stage installs packages outside scripts/install-deps");
  for (const flag of ["-DCMAKE_BUILD_TYPE=Release", "-DATTNSERVE_BUILD_TESTS=OFF",
                      variant === "cpu" ? "-DATTNSERVE_CUDA=OFF" : "-DATTNSERVE_CUDA=ON"]) {
    if (!runs.includes(flag)) fail(`build stage cmake lacks ${flag}`);
  }
}

// Runtime stage.
if (!/^debian:bookworm(-slim)?$/.test(runtime.image)) fail(`runtime image ${runtime.image}: expected debian:bookworm(-slim)`);
const rtRuns = runtime.body.filter((i) => i.op === "RUN").map((i) => i.args).join("\n");
const installs = [...rtRuns.matchAll(/apt-get install((?:\s+[-\w.+]+)+)/g)]
  .flatMap((m) => m[1].trim().split(/\s+/)).filter((w) => !w.startsWith("-"));
if (installs.length === 0) fail("runtime stage installs no packages");
// One apt-cache call for all (it prints the packages it knows, errors for the rest).
let aptOut = "";
try {
  aptOut = execFileSync("apt-cache", ["show", "--no-all-versions", ...installs], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
} catch (e) {
  aptOut = e.stdout ?? "";
}
const known = new Set([...aptOut.matchAll(/^Package: (\S+)$/gm)].map((m) => m[1]));
for (const p of installs) {
  if (/-dev$|^build-essential$|^(g\+\+|gcc|cmake|ninja-build|ccache|protobuf-compiler.*)$/.test(p)) {
    fail(`runtime stage installs build-time package ${p}`);
  }
  if (!known.has(p)) fail(`runtime package ${p} is unknown to apt (apt-cache show)`);
}
const last = (op) => runtime.body.filter((i) => i.op === op).at(-1)?.args;
const user = last("USER");
if (!user || !/^[1-9]\d*(:\d+)?$/.test(user)) fail(`runtime USER ${user}: expected a numeric non-root uid`);
const exposed = runtime.body.filter((i) => i.op === "EXPOSE").flatMap((i) => i.args.split(/\s+/));
for (const port of ["50051", "9464"]) if (!exposed.includes(port)) fail(`runtime does not EXPOSE ${port}`);
let entrypoint = [];
try { entrypoint = JSON.parse(last("ENTRYPOINT") ?? "[]"); } catch { fail("ENTRYPOINT must be exec (JSON) form"); }
if (!/(^|\/)attnserve$/.test(entrypoint[0] ?? "")) fail(`ENTRYPOINT ${JSON.stringify(entrypoint)}: expected attnserve`);
const fromBuild = runtime.body.filter((i) => i.op === "COPY" && i.args.includes("--from=build"));
if (fromBuild.length === 0) fail("runtime stage copies nothing from the build stage");

// Libraries of a local build -> the Debian packages that ship them.
if (buildDir) {
  const binaries = ["server/attnserve", "client/attnctl"].map((b) => join(buildDir, b)).filter(existsSync);
  if (binaries.length === 0) {
    console.log(`${dockerfileName}: no binaries under ${buildDir}; library coverage not checked`);
  }
  // In debian:bookworm-slim already: the C library and GCC's runtime.
  const base = new Set(["libc6", "libgcc-s1"]);
  const before = problems.length;
  const needed = []; // [binary, soname, path]
  for (const bin of binaries) {
    const ldd = execFileSync("ldd", [bin], { encoding: "utf8" });
    for (const m of ldd.matchAll(/^\s*(\S+) => (\S+)/gm)) {
      const [, soname, path] = m;
      if (path === "not") { fail(`${bin}: ${soname} not found`); continue; }
      if (/libcuda\.so|^\/usr\/local\/cuda\//.test(`${soname} ${path}`)) continue; // from the driver / toolkit
      needed.push([bin, soname, path]);
    }
  }
  // Merged /usr: dpkg may list a library under /lib or /usr/lib; ask for both
  // spellings in one dpkg-query call (it reports the ones it knows).
  const spellings = (path) => [path, path.replace(/^\/usr\/lib\//, "/lib/"), path.replace(/^\/lib\//, "/usr/lib/")];
  let dpkgOut = "";
  try {
    dpkgOut = execFileSync("dpkg-query", ["-S", ...new Set(needed.flatMap(([, , path]) => spellings(path)))],
                           { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
  } catch (e) {
    dpkgOut = e.stdout ?? "";
  }
  const ownerOf = new Map();
  for (const m of dpkgOut.matchAll(/^([^:\s]+)(?::\S+)?: (\S+)$/gm)) ownerOf.set(m[2], m[1]);
  for (const [bin, soname, path] of needed) {
    const owner = spellings(path).map((p) => ownerOf.get(p)).find(Boolean);
    if (!owner) { fail(`${bin}: ${path} belongs to no Debian package`); continue; }
    if (!base.has(owner) && !installs.includes(owner)) {
      fail(`${bin} loads ${soname} from ${owner}, which the runtime stage does not install`);
    }
  }
  if (binaries.length && problems.length === before) console.log(`${dockerfileName}: libraries of ${binaries.join(", ")} covered by the runtime packages`);
}

if (problems.length) {
  for (const p of problems) console.error(`${dockerfileName}: ${p}`);
  process.exit(1);
}
console.log(`${dockerfileName}: ${stages.length} stages, ${copied.length} context paths copied, ` +
  `${installs.length} runtime packages known to apt`);
console.log(`runtime packages: ${installs.join(" ")}`);
