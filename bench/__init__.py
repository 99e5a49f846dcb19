"""The benchmark suite: ``python -m bench`` runs what fits the machine (``bench/__main__.py``)."""
