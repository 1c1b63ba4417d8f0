"""Training, evaluation, screening and indexing for lungviz (``python -m training --help``)."""
