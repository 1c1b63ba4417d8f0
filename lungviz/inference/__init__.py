"""From a case to a typed prediction: the nodule model's reading, its estimate by its factors, the slice view,
the nodule finder and the lung mask."""
