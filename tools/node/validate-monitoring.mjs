// Validates ServiceMonitor, PodMonitor and PrometheusRule objects (a JSON list, file argv[2]) against
// the Prometheus Operator's CRD schemas as packaged by @kubernetes-models/prometheus-operator.
// Prints one line per object; exits 1 if any is invalid. Used by tests/test_chart.py.
import { readFileSync } from 'node:fs';
import { ServiceMonitor, PodMonitor, PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';

const kinds = { ServiceMonitor, PodMonitor, PrometheusRule };
let failed = 0;
for (const doc of JSON.parse(readFileSync(process.argv[2], 'utf8'))) {
  try {
    new kinds[doc.kind](doc).validate();
    console.log(`ok ${doc.kind}/${doc.metadata.name}`);
  } catch (error) {
    failed += 1;
    console.log(`invalid ${doc.kind}/${doc.metadata.name}: ${error.message}`);
  }
}
process.exit(failed ? 1 : 0);
