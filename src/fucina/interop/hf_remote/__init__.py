"""Remote code shipped with a Hugging Face export of a PicoDAC-style model (see modeling_fucina_picodac.py).

These two files are copied verbatim next to config.json (`auto_map`), so `transformers` can load the
export with `trust_remote_code=True` and without fucina installed.
"""
