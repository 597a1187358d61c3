"""hanabi_runtime package."""
