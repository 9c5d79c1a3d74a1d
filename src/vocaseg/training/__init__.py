"""Training code (imported only by training commands; the inference library does not need it)."""
