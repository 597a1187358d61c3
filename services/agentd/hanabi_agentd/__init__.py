"""hanabi_agentd package."""
