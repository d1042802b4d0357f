"""g2rpo: G2RPO-A (Guided GRPO with Adaptive Guidance) training, on one machine or on Kubernetes."""

__version__ = "0.1.0"
