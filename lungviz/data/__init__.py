"""Data in: image and DICOM readers, the LIDC and histology importers, cases, labels, splits, uploads and
the pure-numpy preprocessing every model's view is cut with."""
