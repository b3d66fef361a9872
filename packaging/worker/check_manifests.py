#!/usr/bin/env python3
"""Offline checks of the worker's deployment definitions that kubernetes-validate cannot make
(packaging/worker/check runs this, with its venv's PyYAML and jsonschema):

  * KEDA's ScaledObject and TriggerAuthentication (custom resources: not in kubernetes-validate's
    schemas) against the openAPIV3Schema of KEDA's CRDs (schemas/keda-v2.20.2.json), strictly:
    an unknown field is an error, as `kubectl apply` (--validate=strict) makes it;
  * the postgresql scaler's own rules (KEDA v2.20.2 pkg/scalers/postgresql_scaler.go): a query, a
    targetQueryValue that is a number > 0, a numeric activationTargetQueryValue, and a connection
    (TriggerAuthentication parameter "connection", or connectionFromEnv naming an env variable
    of the scaled container);
  * the references between the files: Secret name and key, Deployment names, the
    TriggerAuthentication, kustomization.yaml's resources and images;
  * the Deployments against the worker: every argument an option of doppler-worker (from its
    --help when given, else the documented list), the health port the probes use, /healthz
    liveness and /readyz readiness, the non-root user of the images (10001), a read-only root,
    the model volume, a grace period to drain a batch, GPU limits;
  * the Containerfiles' EXPOSE/USER/CMD and worker.env's DOPPLER_WORKER_ARGS against the same.

Usage: check_manifests.py [--help-text FILE] [--self-test]
  --help-text FILE  doppler-worker --help's output (the options it knows)
  --self-test       also check that broken copies of the manifests are caught
Exit status 0 when everything holds; each problem is printed as a FAIL line.
"""

import copy
import json
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent
K8S = HERE / "kubernetes"
KEDA_SCHEMAS = HERE / "schemas" / "keda-v2.20.2.json"
IMAGE_UID = 10001
MODEL_DIR = "/var/lib/doppler/models"
# doppler-worker's options (the CLI contract), when no --help text is given
DOCUMENTED_OPTIONS = {
    "--once", "--model-dir", "--provider", "--device", "--intra-op-threads", "--decode-threads",
    "--batch", "--ort-library", "--path-map", "--poll-interval", "--health-port", "--name",
    "--help", "--version",
}
FLAGS = {"--once", "--help", "--version"}
PROVIDERS = {"cpu", "cuda", "auto"}


def strict(schema):
    """The schema with additionalProperties: false wherever it lists properties and does not
    say otherwise (x-kubernetes-preserve-unknown-fields, additionalProperties)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def parse_args(args):
    """[(option, value or None)] from a worker argument list; non-options as (None, arg)."""
    out = []
    it = iter(args)
    for a in it:
        if not a.startswith("--"):
            out.append((None, a))
            continue
        name, eq, val = a.partition("=")
        if not eq and name not in FLAGS:
            val = next(it, None)
        out.append((name, val if (eq or name not in FLAGS) else None))
    return out


class Checker:
    def __init__(self, docs, options, files):
        self.docs = docs          # [(file name, document)]
        self.options = options
        self.files = files        # other texts: Containerfile, Containerfile.cuda, worker.env, kustomization
        self.failures = []
        self.passes = 0

    def ok(self, cond, what):
        if cond:
            self.passes += 1
        else:
            self.failures.append(what)
        return cond

    def of_kind(self, kind):
        return [(f, d) for f, d in self.docs if d.get("kind") == kind]

    def find(self, kind, name):
        for f, d in self.of_kind(kind):
            if d.get("metadata", {}).get("name") == name:
                return d
        return None

    # --- the worker's arguments ---------------------------------------------------------------
    def check_worker_args(self, where, args):
        parsed = parse_args(args)
        for name, val in parsed:
            if name is None:
                self.ok(False, f"{where}: unexpected argument {val!r} (the connection string belongs in DOPPLER_WORKER_CONNINFO)")
                continue
            self.ok(name in self.options, f"{where}: {name} is not an option of doppler-worker")
            if name in self.options and name not in FLAGS:
                self.ok(val not in (None, ""), f"{where}: {name} needs a value")
            if name == "--provider":
                self.ok(str(val).lower() in PROVIDERS, f"{where}: --provider {val} is not cpu, cuda or auto")
            if name in ("--batch",):
                self.ok(str(val).isdigit() and 1 <= int(val) <= 1000, f"{where}: --batch {val} not in 1..1000")
            if name in ("--health-port", "--device", "--intra-op-threads", "--decode-threads"):
                self.ok(str(val).isdigit(), f"{where}: {name} {val} is not a whole number")
            if name == "--path-map":
                self.ok(val is not None and "=" in val and val.startswith("/") and val.split("=", 1)[1].startswith("/"),
                        f"{where}: --path-map {val} is not /FROM=/TO")
        return {n: v for n, v in parsed if n}

    # --- Deployments --------------------------------------------------------------------------
    def check_deployments(self):
        deps = self.of_kind("Deployment")
        self.ok(len(deps) >= 2, "expected the CPU and the GPU Deployment")
        for f, d in deps:
            name = d["metadata"]["name"]
            w = f"{f}: Deployment {name}"
            spec = d["spec"]
            self.ok("replicas" not in spec, f"{w}: spec.replicas set (KEDA owns the replica count; a re-apply would reset it)")
            pod = spec["template"]["spec"]
            self.ok(pod.get("terminationGracePeriodSeconds", 30) >= 60,
                    f"{w}: terminationGracePeriodSeconds < 60: too short to drain a batch")
            psc = pod.get("securityContext", {})
            self.ok(psc.get("runAsNonRoot") is True, f"{w}: runAsNonRoot is not true")
            self.ok(psc.get("runAsUser") == IMAGE_UID, f"{w}: runAsUser is not the images' user {IMAGE_UID}")
            containers = pod["containers"]
            self.ok(len(containers) == 1, f"{w}: expected one container")
            c = containers[0]
            csc = c.get("securityContext", {})
            self.ok(csc.get("readOnlyRootFilesystem") is True, f"{w}: readOnlyRootFilesystem is not true")
            self.ok(csc.get("allowPrivilegeEscalation") is False, f"{w}: allowPrivilegeEscalation is not false")
            self.ok("ALL" in csc.get("capabilities", {}).get("drop", []), f"{w}: capabilities not dropped")
            self.ok(not c.get("command"), f"{w}: command overrides the image's entrypoint doppler-worker")
            opts = self.check_worker_args(w, c.get("args", []))
            env = {e["name"]: e for e in c.get("env", [])}
            # the connection, from the Secret
            ci = env.get("DOPPLER_WORKER_CONNINFO", {})
            ref = ci.get("valueFrom", {}).get("secretKeyRef")
            if self.ok(ref is not None, f"{w}: DOPPLER_WORKER_CONNINFO does not come from a Secret"):
                sec = self.find("Secret", ref["name"])
                if self.ok(sec is not None, f"{w}: Secret {ref['name']} not in the manifests"):
                    keys = set(sec.get("stringData", {})) | set(sec.get("data", {}))
                    self.ok(ref["key"] in keys, f"{w}: Secret {ref['name']} has no key {ref['key']}")
            # the health server and the probes
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            hp = opts.get("--health-port")
            if self.ok(hp is not None and hp != "0", f"{w}: no --health-port: the probes have nothing to ask"):
                self.ok(int(hp) in ports.values(), f"{w}: --health-port {hp} is not a containerPort")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                p = c.get(probe)
                if not self.ok(p is not None and "httpGet" in p, f"{w}: no {probe} httpGet"):
                    continue
                g = p["httpGet"]
                self.ok(g.get("path") == path, f"{w}: {probe} path {g.get('path')} is not {path}")
                port = ports.get(g["port"], g["port"])
                self.ok(hp is not None and str(port) == str(hp), f"{w}: {probe} port {g['port']} is not the health port {hp}")
            sp = c.get("startupProbe")
            if sp:
                self.ok(sp.get("httpGet", {}).get("path") == "/healthz", f"{w}: startupProbe is not /healthz")
            # resources
            res = c.get("resources", {})
            self.ok(bool(res.get("requests")) and bool(res.get("limits")), f"{w}: resources requests and limits not both set")
            # the models
            model_dir = opts.get("--model-dir") or env.get("DOPPLER_MODEL_DIR", {}).get("value") or MODEL_DIR
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            m = mounts.get(model_dir)
            if self.ok(m is not None, f"{w}: nothing mounted at the model dir {model_dir}"):
                self.ok(m.get("readOnly") is True, f"{w}: the model volume is not read-only")
                vols = {v["name"]: v for v in pod.get("volumes", [])}
                self.ok(m["name"] in vols, f"{w}: volume {m['name']} not defined")
                self.ok("configMap" not in vols.get(m["name"], {}), f"{w}: models from a ConfigMap (1 MiB at most)")
            self.ok("/tmp" in mounts, f"{w}: no writable /tmp under a read-only root")
            # CPU or GPU
            gpu = res.get("limits", {}).get("nvidia.com/gpu")
            provider = (opts.get("--provider") or "cpu").lower()
            if gpu is not None:
                self.ok(provider == "cuda", f"{w}: a GPU limit but --provider {provider}")
                self.ok("cuda" in c["image"], f"{w}: a GPU limit but not the CUDA image ({c['image']})")
                self.ok(bool(pod.get("tolerations")) or bool(pod.get("nodeSelector")), f"{w}: GPU pods without nodeSelector or tolerations")
            else:
                self.ok(provider == "cpu", f"{w}: --provider {provider} without a GPU limit")

    # --- KEDA ---------------------------------------------------------------------------------
    def check_keda(self, schemas):
        for kind in ("ScaledObject", "TriggerAuthentication"):
            for f, d in self.of_kind(kind):
                key = f"{d.get('apiVersion')}/{kind}"
                schema = schemas.get(key)
                if not self.ok(schema is not None, f"{f}: no KEDA schema for {key}"):
                    continue
                errors = sorted(jsonschema.Draft7Validator(strict(schema)).iter_errors(d), key=lambda e: list(e.path))
                for e in errors:
                    self.ok(False, f"{f}: {kind} {d['metadata'].get('name')}: {'.'.join(map(str, e.path)) or '(top)'}: {e.message}")
                if not errors:
                    self.passes += 1
        sos = self.of_kind("ScaledObject")
        self.ok(len(sos) >= 1, "no ScaledObject")
        for f, so in sos:
            w = f"{f}: ScaledObject {so['metadata']['name']}"
            spec = so.get("spec", {})
            ref = spec.get("scaleTargetRef", {})
            self.ok(ref.get("kind", "Deployment") == "Deployment", f"{w}: scaleTargetRef is not a Deployment")
            dep = self.find("Deployment", ref.get("name"))
            self.ok(dep is not None, f"{w}: scaleTargetRef {ref.get('name')} is not a Deployment in the manifests")
            self.ok(spec.get("minReplicaCount", 0) == 0, f"{w}: minReplicaCount is not 0 (no scale to zero)")
            self.ok(spec.get("maxReplicaCount", 100) >= 1, f"{w}: maxReplicaCount < 1")
            pg = [t for t in spec.get("triggers", []) if t.get("type") == "postgresql"]
            if not self.ok(len(pg) == 1, f"{w}: expected one postgresql trigger"):
                continue
            t = pg[0]
            md = t.get("metadata", {})
            self.ok(all(isinstance(v, str) for v in md.values()), f"{w}: trigger metadata values must be strings")
            q = md.get("query", "")
            self.ok(bool(q.strip()), f"{w}: no query")
            self.ok(re.search(r"\bdoppler\.worker_backlog\(\)", q) is not None, f"{w}: the query does not ask doppler.worker_backlog()")
            tq = number(md.get("targetQueryValue"))
            self.ok(tq is not None and tq > 0, f"{w}: targetQueryValue {md.get('targetQueryValue')!r} is not a number > 0 (the scaler refuses 0 or none)")
            if "activationTargetQueryValue" in md:
                aq = number(md["activationTargetQueryValue"])
                self.ok(aq is not None and aq >= 0, f"{w}: activationTargetQueryValue is not a number >= 0")
            for k in ("targetValue", "value", "connection", "password", "connectionString"):
                self.ok(k not in md, f"{w}: metadata {k} is not how the postgresql scaler takes it (secrets go through a TriggerAuthentication)")
            # the connection
            has_conn = False
            if "connectionFromEnv" in md and dep is not None:
                envs = {e["name"] for c in dep["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
                has_conn = self.ok(md["connectionFromEnv"] in envs, f"{w}: connectionFromEnv {md['connectionFromEnv']} is not an env variable of {ref.get('name')}")
            auth = t.get("authenticationRef")
            if auth:
                self.ok(auth.get("kind", "TriggerAuthentication") == "TriggerAuthentication", f"{w}: authenticationRef kind")
                ta = self.find("TriggerAuthentication", auth.get("name"))
                if self.ok(ta is not None, f"{w}: TriggerAuthentication {auth.get('name')} not in the manifests"):
                    params = {r.get("parameter"): r for r in ta["spec"].get("secretTargetRef", [])}
                    if self.ok("connection" in params, f"{w}: TriggerAuthentication {auth.get('name')} has no parameter connection"):
                        has_conn = True
            self.ok(has_conn, f"{w}: no connection (TriggerAuthentication parameter connection, or connectionFromEnv)")
        for f, ta in self.of_kind("TriggerAuthentication"):
            w = f"{f}: TriggerAuthentication {ta['metadata']['name']}"
            for r in ta.get("spec", {}).get("secretTargetRef", []):
                sec = self.find("Secret", r.get("name"))
                if self.ok(sec is not None, f"{w}: Secret {r.get('name')} not in the manifests"):
                    keys = set(sec.get("stringData", {})) | set(sec.get("data", {}))
                    self.ok(r.get("key") in keys, f"{w}: Secret {r.get('name')} has no key {r.get('key')}")
                self.ok(r.get("parameter") in {"connection", "password", "host", "port", "userName", "dbName", "sslmode"},
                        f"{w}: parameter {r.get('parameter')} is not one the postgresql scaler reads")

    # --- kustomization, Containerfiles, worker.env --------------------------------------------
    def check_kustomization(self):
        k = yaml.safe_load(self.files["kustomization.yaml"])
        w = "kustomization.yaml"
        for r in k.get("resources", []):
            self.ok((K8S / r).is_file(), f"{w}: resource {r} does not exist")
        images = {c["image"].rsplit(":", 1)[0] for _, d in self.of_kind("Deployment")
                  for c in d["spec"]["template"]["spec"]["containers"]}
        for i in k.get("images", []):
            self.ok(i["name"] in images, f"{w}: images entry {i['name']} matches no Deployment's image")
        listed = set(k.get("resources", []))
        for f, d in self.docs:
            if d.get("kind") == "ScaledObject" and f in listed:
                tgt = d["spec"]["scaleTargetRef"]["name"]
                dep_files = {ff for ff, dd in self.of_kind("Deployment") if dd["metadata"]["name"] == tgt}
                self.ok(bool(dep_files & listed), f"{w}: {f} scales {tgt}, whose Deployment is not listed")

    def check_containerfiles(self):
        for name in ("Containerfile", "Containerfile.cuda"):
            text = self.files[name]
            w = name
            user = re.findall(r"^USER\s+(\S+)", text, re.M)
            self.ok(user and user[-1].split(":")[0] == str(IMAGE_UID), f"{w}: USER is not {IMAGE_UID}")
            ep = re.findall(r"^ENTRYPOINT\s+(\[.*\])", text, re.M)
            self.ok(ep and json.loads(ep[-1]) == ["doppler-worker"], f"{w}: ENTRYPOINT is not [\"doppler-worker\"]")
            cmd = re.findall(r"^CMD\s+(\[.*\])", text, re.M)
            opts = self.check_worker_args(f"{w} CMD", json.loads(cmd[-1])) if cmd else {}
            expose = re.findall(r"^EXPOSE\s+(\d+)", text, re.M)
            self.ok(expose and opts.get("--health-port") == expose[-1], f"{w}: EXPOSE is not the CMD's --health-port")
            self.ok(re.search(r"^VOLUME\s+\[\"" + re.escape(MODEL_DIR) + r"\"\]", text, re.M) is not None, f"{w}: no VOLUME {MODEL_DIR}")
            self.ok(re.search(r"^HEALTHCHECK", text, re.M) is None, f"{w}: a HEALTHCHECK (the probes do that)")
            self.ok("/usr/lib/doppler/libonnxruntime.so" in text, f"{w}: ONNX Runtime not at /usr/lib/doppler/libonnxruntime.so")
            if name.endswith(".cuda"):
                self.ok(opts.get("--provider") == "cuda", f"{w}: CMD without --provider cuda")

    def check_worker_env(self):
        text = self.files["worker.env"]
        for line in text.splitlines():
            s = line.strip()
            if s.startswith("#"):
                s = s.lstrip("#").strip()
                if not s.startswith("DOPPLER_WORKER_ARGS="):
                    continue
            m = re.match(r"^DOPPLER_WORKER_ARGS=(.*)$", s)
            if m:
                self.check_worker_args(f"worker.env {s[:40]}...", shlex.split(m.group(1))[0].split())
        self.ok(re.search(r"^DOPPLER_WORKER_CONNINFO=", text, re.M) is not None, "worker.env: no DOPPLER_WORKER_CONNINFO")


def load(options):
    docs = []
    for p in sorted(K8S.glob("*.yaml")):
        if p.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(p.read_text()):
            if d:
                docs.append((p.name, d))
    files = {n: (HERE / n).read_text() for n in ("Containerfile", "Containerfile.cuda", "worker.env")}
    files["kustomization.yaml"] = (K8S / "kustomization.yaml").read_text()
    return docs, files


def run(docs, files, options, schemas):
    c = Checker(docs, options, files)
    c.check_deployments()
    c.check_keda(schemas)
    c.check_kustomization()
    c.check_containerfiles()
    c.check_worker_env()
    return c


def self_test(docs, files, options, schemas):
    """Broken copies of the manifests must each be caught."""
    def mutate(fn):
        d2 = copy.deepcopy(docs)
        for f, d in d2:
            fn(f, d)
        return d2

    def so(fn):
        return lambda f, d: fn(d) if d.get("kind") == "ScaledObject" else None

    def kind(k, fn):
        return lambda f, d: fn(d) if d.get("kind") == k else None

    def first_container(d):
        return d["spec"]["template"]["spec"]["containers"][0]

    cases = {
        "targetQueryValue misspelt": so(lambda d: d["spec"]["triggers"][0]["metadata"].update(targetValue=d["spec"]["triggers"][0]["metadata"].pop("targetQueryValue"))),
        "targetQueryValue 0": so(lambda d: d["spec"]["triggers"][0]["metadata"].update(targetQueryValue="0")),
        "metadata value not a string": so(lambda d: d["spec"]["triggers"][0]["metadata"].update(targetQueryValue=500)),
        "unknown ScaledObject field": so(lambda d: d["spec"].update(minReplicas=0)),
        "scaleTargetRef to nothing": so(lambda d: d["spec"]["scaleTargetRef"].update(name="nope")),
        "no query": so(lambda d: d["spec"]["triggers"][0]["metadata"].pop("query")),
        "authenticationRef to nothing": so(lambda d: d["spec"]["triggers"][0]["authenticationRef"].update(name="nope")),
        "TriggerAuthentication parameter": kind("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].update(parameter="connectionString")),
        "TriggerAuthentication secret key": kind("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].update(key="dsn")),
        "unknown worker option": kind("Deployment", lambda d: first_container(d)["args"].append("--threads=4")),
        "probe path": kind("Deployment", lambda d: first_container(d)["livenessProbe"]["httpGet"].update(path="/health")),
        "writable root": kind("Deployment", lambda d: first_container(d)["securityContext"].update(readOnlyRootFilesystem=False)),
        "root user": kind("Deployment", lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0)),
        "secret key": kind("Deployment", lambda d: first_container(d)["env"][0]["valueFrom"]["secretKeyRef"].update(key="url")),
        "short grace": kind("Deployment", lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=10)),
    }
    missed = []
    for name, fn in cases.items():
        c = run(mutate(fn), files, options, schemas)
        if not c.failures:
            missed.append(name)
        else:
            print(f"  self-test: {name}: caught ({c.failures[0]})")
    env_bad = dict(files, **{"worker.env": files["worker.env"].replace("--batch 32", "--batchsize 32")})
    if not run(docs, env_bad, options, schemas).failures:
        missed.append("worker.env option")
    return missed


def main(argv):
    options = set(DOCUMENTED_OPTIONS)
    source = "the documented CLI"
    if "--help-text" in argv:
        text = Path(argv[argv.index("--help-text") + 1]).read_text()
        found = set(re.findall(r"^\s+(--[a-z][a-z-]*)", text, re.M)) | set(re.findall(r"(--help|--version)\b", text))
        if found:
            options, source = found, "doppler-worker --help"
            missing = DOCUMENTED_OPTIONS - found
            if missing:
                print(f"FAIL doppler-worker --help lacks the contract's options {sorted(missing)}")
                return 1
    schemas = json.loads(KEDA_SCHEMAS.read_text())["schemas"]
    docs, files = load(options)
    c = run(docs, files, options, schemas)
    for f in c.failures:
        print(f"FAIL {f}")
    kinds = sorted({f"{d['kind']}/{d['metadata']['name']}" for _, d in docs})
    print(f"{'ok' if not c.failures else 'FAILED'}: {c.passes} checks passed, {len(c.failures)} failed "
          f"({', '.join(kinds)}; worker options from {source}; KEDA schemas {KEDA_SCHEMAS.name})")
    status = 1 if c.failures else 0
    if "--self-test" in argv and not c.failures:
        missed = self_test(docs, files, options, schemas)
        if missed:
            print(f"FAIL self-test: broken copies not caught: {missed}")
            status = 1
        else:
            print("ok: self-test: every broken copy was caught")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
