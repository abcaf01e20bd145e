"""r1v-distill pipeline spine: typed configs, run directory, manifests, stage runner, CLI and ingest."""

__version__ = "0.1.0"
