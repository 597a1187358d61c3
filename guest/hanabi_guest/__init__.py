"""hanabi_guest package."""
