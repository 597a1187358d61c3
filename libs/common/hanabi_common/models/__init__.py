"""Pydantic models of every RPC message, one module per daemon."""
