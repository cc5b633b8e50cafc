"""Model families other than ECAR, each in its own subpackage (``flowar``: FlowAR, Ren et al. 2024).

ECAR's own reference model currently lives in :mod:`ecar_export.model`. A family package holds the
torch re-implementation used for export, its config and the converter from the authors' checkpoints.
"""
