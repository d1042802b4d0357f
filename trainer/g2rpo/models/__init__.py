"""Models: the bundled small model (converted once from GGUF) and a tiny offline test model."""
