"""Optional integrations of flexpbs with other libraries.

Each submodule imports its library on import; importing :mod:`flexpbs` or this package imports none:

- :mod:`flexpbs.integrations.transformers`: ``register()`` adds PBS prefill attention to Hugging Face
  transformers' ``AttentionInterface`` (extra ``hf``: ``pip install "flexpbs[hf]"``).
"""
