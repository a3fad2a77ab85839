"""Model definitions for snakelearn (torch only; imports nothing else of ours).

Every model is a small ``nn.Module`` built from a config dataclass, in the
nanoGPT style. Parameter paths (``named_parameters()`` names) are stable: they
are the names under which weights travel between nodes. Each model also names
its ordered **layer groups**: module-path prefixes that partition its parameters
and buffers, front (input) to back (output). Snake Learning assigns contiguous
runs of these groups (segments) to nodes.
"""

from models.registry import MODELS, InputSpec, build_model, layer_groups

__all__ = ["MODELS", "InputSpec", "build_model", "layer_groups"]
