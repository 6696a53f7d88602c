"""pref-lightning: pairwise human-preference prediction with DeBERTa, Lightning and Hydra."""

__version__ = "0.1.0"
