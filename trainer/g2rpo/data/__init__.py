"""Training data: the built-in arithmetic generator, curriculum ordering, and loading any source
into the one shape the trainer reads (`g2rpo.data.load.load_training_dataset`).

Nothing is imported here, so that the generator and the curriculum stay usable without `datasets`.
"""
