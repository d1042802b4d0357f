"""G2RPOJobs on a cluster, from Python (`JobClient`) and from the command line (`g2rpo submit|status|logs|list|delete`)."""

from g2rpo.client.api import ClusterError, JobClient, JobView

__all__ = ["ClusterError", "JobClient", "JobView"]
