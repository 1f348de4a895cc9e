"""commhub's own non-channel plugins: the default TF-IDF classifier (``tfidf``).

Each module here is a pluggy plugin listed in ``commhub.core.plugins.DEFAULT_PLUGINS``
and registered through the same hooks a third-party package uses.
"""
