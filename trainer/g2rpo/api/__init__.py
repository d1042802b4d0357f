"""The contract between the parts of g2rpo: what a user writes, what the cluster stores, and the names
the operator's pods and the trainer's and controller's entry points must agree on.

- `spec`: the G2RPOJob model (the one source of truth for the YAML a user writes);
- `status`: the G2RPOJob's status model and its conditions;
- `crd`: the CustomResourceDefinition rendered from both, with the admission rules;
- `bundled`: the table of bundled models (`bundled:<name>`);
- `names`: environment variables, ports, mount paths and command-line flags shared by the operator's
  builders, the trainer and the controller.

This package is the bottom layer: it needs only pydantic and PyYAML, never g2rpo_operator or the
trainer's dependencies (torch, TRL), so that the operator, the controller and `g2rpo validate`/`g2rpo crd`
all read the same contract. Nothing here imports another g2rpo package (tests/test_layers.py): the
table of bundled models (`bundled`) lives here, and g2rpo.models.bundled, which loads them, reads it.
"""
