"""The g2rpo Kubernetes operator: reconciles G2RPOJob resources into the pods that train them.

Layout: `builders` turn a spec into child manifests (pure functions); `admission`, `lifecycle` and
`conditions` decide (pure functions); `reconcile` reads the children and applies those decisions;
`handlers` wires kopf to it; `__main__` runs it. The job's model, status and CRD are the
contract in g2rpo.api.
"""
