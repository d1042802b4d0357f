"""The guidance controller: the job's single source of truth for the guidance length l_k."""
