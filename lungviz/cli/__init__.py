"""``python -m lungviz predict | locate | bench``."""
