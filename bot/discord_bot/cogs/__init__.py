"""Slash commands, one cog per concern; each parses, calls one core function, renders."""
