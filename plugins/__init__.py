"""commhub's own non-channel plugins: the default classifier (``tfidf``) and the optional
``minilm`` classifier (usable once its weights are installed), with their tokenizer,
static embeddings and numpy sentence encoder.

Each module here is a pluggy plugin listed in ``commhub.core.plugins.DEFAULT_PLUGINS``
and registered through the same hooks a third-party package uses.
"""
