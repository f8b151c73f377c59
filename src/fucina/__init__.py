"""fucina: build small Italian language models from scratch, end to end, in plain PyTorch.

Data flows one way: corpus -> tokens -> batches -> model -> loss -> checkpoint -> export/serve.
"""

__version__ = "0.1.0"
