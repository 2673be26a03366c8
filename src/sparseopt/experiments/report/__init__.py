"""`sparseopt report`: tables, paired statistics and plots from finished runs and sweeps."""
