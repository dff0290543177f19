"""Everything that touches megatron-core. Nothing outside this package imports megatron."""

import warnings

# megatron-core warns at import time about what it falls back to without apex and TE. The optimizer kernels it
# names are replaced by apex_free, and the local spec's torch norms are this project's choice, so on every run
# these lines would only mislead; its "full scope is deprecated" comes from its own default cuda_graph_scope.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed. Falling back to Torch Norm",
                 "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
