"""Studies that train several models with fucina's one training loop and compare them.

- `depth_width.py`: the "LLM from scratch" depth-versus-width experiment on Italian (plan, runs, verdict),
  with `shapes.py` (the scaled configurations and their FLOPs), `corpus.py` (the data) and `plots.py`.
"""
