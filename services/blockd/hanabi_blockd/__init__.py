"""hanabi_blockd package."""
