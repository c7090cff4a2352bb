"""Package data: the calibration text of the importance matrix and the held-out text of the quality report."""
