"""fedtune: federated fine-tuning of language models, Kubernetes-native, with a local mode.

This package is the control plane. It must never import torch at module load.
"""

__version__ = "0.1.0"
