"""Guided roll-outs: which rows are guided (rows) and how long their guidance is (schedule)."""
