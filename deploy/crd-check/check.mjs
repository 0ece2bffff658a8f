// Validates the custom resources of the rendered Kubernetes manifests (KEDA's ScaledObject and
// TriggerAuthentication, the Prometheus Operator's PodMonitor) against their published
// schemas (npm @kubernetes-models/keda and @kubernetes-models/prometheus-operator), which
// kubernetes-validate does not know.
//
//   kubectl kustomize deploy/k8s | <YAML to a JSON array> | node deploy/crd-check/check.mjs [NODE_MODULES]
//
// NODE_MODULES is where those packages are installed (default: the tools prefix of
// scripts/tools.sh, $TALLY_TOOLS_DIR/npm/node_modules). Exits 1 when a resource is invalid or
// an expected kind is missing (so that checking nothing cannot pass), 64 on bad usage.
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const toolsDir = process.env.TALLY_TOOLS_DIR || join(homedir(), ".cache", "tally-tools");
const modules = process.argv[2] || join(toolsDir, "npm", "node_modules");

// By file path rather than package name: the packages live in the tools prefix, not beside
// this script, and ES modules ignore NODE_PATH.
async function load(file) {
  const path = join(modules, file);
  try {
    return await import(pathToFileURL(path).href);
  } catch (e) {
    console.error(`cannot load ${path} (run scripts/tools.sh's ensure_tools): ${e.message}`);
    process.exit(64);
  }
}

const keda = await load("@kubernetes-models/keda/keda.sh/v1alpha1/index.mjs");
const monitoring = await load("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js");

const MODELS = {
  "keda.sh/v1alpha1 ScaledObject": keda.ScaledObject,
  "keda.sh/v1alpha1 TriggerAuthentication": keda.TriggerAuthentication,
  "monitoring.coreos.com/v1 PodMonitor": monitoring.PodMonitor,
};

let docs;
try {
  docs = JSON.parse(readFileSync(0, "utf8"));
} catch (e) {
  console.error(`stdin is not JSON: ${e.message}`);
  process.exit(64);
}
if (!Array.isArray(docs)) {
  console.error("stdin is not a JSON array of manifests");
  process.exit(64);
}

const seen = new Set();
let failed = 0;
for (const doc of docs) {
  const key = `${doc?.apiVersion} ${doc?.kind}`;
  const Model = MODELS[key];
  if (!Model) continue;
  seen.add(key);
  const name = doc.metadata?.name ?? "(unnamed)";
  try {
    new Model(doc).validate();
    console.log(`ok ${key} ${name}`);
  } catch (e) {
    failed++;
    console.error(`INVALID ${key} ${name}: ${e.message}`);
    for (const err of e.errors ?? []) console.error(`  ${JSON.stringify(err)}`);
  }
}
for (const key of Object.keys(MODELS)) {
  if (!seen.has(key)) {
    failed++;
    console.error(`missing: no ${key} in the input`);
  }
}
process.exit(failed ? 1 : 0);
