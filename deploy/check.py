#!/usr/bin/env python3
"""Checks what can be checked of deploy/ without a container engine or a cluster:
YAML parses, Kubernetes objects are complete and their probes name real ports, compose
services reference defined volumes, the dashboard is valid JSON whose metrics the code emits,
and the shell scripts parse. systemd units are verified by scripts/check-deploy.sh."""
import json, pathlib, re, subprocess, sys
import yaml

root = pathlib.Path(__file__).resolve().parent
repo = root.parent
errors = []

def err(msg):
    errors.append(msg)

# Kubernetes
for doc in yaml.safe_load_all((root / "k8s/wharf.yaml").read_text()):
    kind = doc.get("kind")
    if not (doc.get("apiVersion") and kind and doc.get("metadata", {}).get("name")):
        err(f"k8s object without apiVersion/kind/metadata.name: {doc}")
    if kind == "Deployment":
        spec = doc["spec"]
        if spec["selector"]["matchLabels"].items() - spec["template"]["metadata"]["labels"].items():
            err("Deployment selector does not match the pod labels")
        pod = spec["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if port is None:
                    err(f"{c['name']}: no {probe}")
                elif port not in ports:
                    err(f"{c['name']}: {probe} port {port} not declared")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    err(f"{c['name']}: mounts unknown volume {m['name']}")
            if "resources" not in c:
                err(f"{c['name']}: no resources")

# Compose
compose = yaml.safe_load((root / "compose.yaml").read_text())
volumes = set(compose.get("volumes", {}))
for name, svc in compose["services"].items():
    for v in svc.get("volumes", []):
        source = v.split(":")[0]
        if not source.startswith((".", "/")) and source not in volumes:
            err(f"compose {name}: unknown volume {source}")
    for dep in svc.get("depends_on", []):
        if dep not in compose["services"]:
            err(f"compose {name}: depends on unknown service {dep}")

# Dashboard: every metric it queries is emitted somewhere in the code.
source = "\n".join(p.read_text() for p in repo.glob("*/src/**/*.rs"))
dashboard = json.loads((root / "grafana/wharf-dashboard.json").read_text())
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        for metric in re.findall(r"wharf_[a-z0-9_]+", target["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            if f'"{base}"' not in source:
                err(f"dashboard panel '{panel['title']}' queries {metric}, which no code emits")

# Shell scripts parse.
for script in list(root.glob("*.sh")) + list((repo / "scripts").glob("*.sh")):
    if subprocess.run(["bash", "-n", str(script)]).returncode != 0:
        err(f"{script} does not parse")

if errors:
    print("deploy check failed:\n  " + "\n  ".join(errors))
    sys.exit(1)
print("deploy check: ok")
