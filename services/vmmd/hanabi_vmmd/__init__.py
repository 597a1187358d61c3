"""hanabi_vmmd package."""
