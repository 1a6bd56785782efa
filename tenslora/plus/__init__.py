"""TensLoRA+: heterogeneous learning rates (``optim``), exact spectral metrics (``spectra``,
``metrics``), training monitoring (``monitor``) and metric-driven rank allocation (``allocate``).

Submodules are imported on demand (``from tenslora.plus.optim import build_param_groups``).
"""
