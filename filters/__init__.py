"""Problem assessment, chain verification, redundancy scoring and curation (the `filters` package)."""
