"""predict wing."""
