"""hanabi_netd package."""
