#!/usr/bin/env python3
"""Renders charts/weft with Helm's own engine (Helm v4's Go SDK, shipped in the
helm-python-sdk wheel as libhelm_c: there is no helm binary on this machine), lints it, and
validates every rendered object and every CRD strictly against the Kubernetes OpenAPI schemas
of each requested version (kubernetes-validate). Prints one JSON report on stdout; the Rust
test e2e/tests/helm_chart.rs asserts on it."""

import json
import pathlib
import sys

import helm_python as helm
import kubernetes_validate
import yaml

KUBE_VERSIONS = ["1.29.0", "1.34.0"]


def validate(obj, version):
    try:
        kubernetes_validate.validate(obj, version, strict=True)
        return None
    except Exception as error:  # the library raises several error types; all mean invalid
        return str(error).splitlines()[0]


def objects(text):
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(chart_dir, values):
    chart = helm.Chart.load(str(chart_dir))
    try:
        manifests = chart.render(values=values, name="weft", namespace="kube-system", is_install=True)
    except Exception as error:
        return {"error": str(error)}
    rendered = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for obj in objects(text):
            rendered.append(
                {
                    "template": path,
                    "apiVersion": obj.get("apiVersion"),
                    "kind": obj.get("kind"),
                    "name": (obj.get("metadata") or {}).get("name"),
                    "object": obj,
                    "invalid": {v: validate(obj, v) for v in KUBE_VERSIONS},
                }
            )
    return {"objects": rendered}


def main():
    repo = pathlib.Path(sys.argv[1])
    chart_dir = repo / "charts" / "weft"
    scenarios = json.loads(sys.argv[2])
    report = {"lint": {}, "scenarios": {}, "crds": []}
    for version in KUBE_VERSIONS:
        result = helm.lint(str(chart_dir), strict=True, kube_version=version)
        report["lint"][version] = [
            message for message in result.get("messages", []) if message.get("severity", 0) >= 2
        ] + [{"error": error} for error in result.get("errors", [])]
    for name, values in scenarios.items():
        report["scenarios"][name] = render(chart_dir, values)
    for path in sorted((chart_dir / "crds").glob("*.yaml")):
        for obj in objects(path.read_text()):
            report["crds"].append(
                {
                    "file": path.name,
                    "invalid": {v: validate(obj, v) for v in KUBE_VERSIONS},
                }
            )
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
