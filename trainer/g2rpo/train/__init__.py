"""Training: the G2RPOTrainer (TRL hooks), its metrics and callbacks, and the spec-to-trainer builder."""
