#!/bin/sh
# checkov (3.3.30, in its own ~300 MB venv at .tools/checkov-venv) on the chart rendered three ways:
# defaults, monitoring on, namespaced with a PodMonitor. Not part of `make test` (the venv is large);
# run it after changing templates. Findings are waived in the templates (checkov.io/skipN annotations).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.tools/checkov-venv"
[ -x "$venv/bin/checkov" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q checkov==3.3.30; }
out=$(mktemp -d)
helm="$root/.tools/bin/helm"
"$helm" template g2rpo "$root/charts/g2rpo" -n g2rpo-system > "$out/defaults.yaml"
"$helm" template g2rpo "$root/charts/g2rpo" -n g2rpo-system --set monitoring.serviceMonitor.enabled=true \
  --set monitoring.prometheusRule.enabled=true --set monitoring.grafanaDashboard.enabled=true > "$out/monitoring.yaml"
"$helm" template g2rpo "$root/charts/g2rpo" -n g2rpo-system --set 'watchNamespaces={team-a}' \
  --set monitoring.podMonitor.enabled=true > "$out/namespaced.yaml"
cd "$out" && "$venv/bin/checkov" -d . --framework kubernetes --skip-download --compact --quiet
