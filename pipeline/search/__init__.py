"""Searches over recipes: the check's fallback rounds and `pipeline tune`, sharing one recipe derivation."""
