"""train wing."""
