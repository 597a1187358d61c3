"""hanabi_common package."""
