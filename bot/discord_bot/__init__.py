"""The Discord glue: translates gateway events and slash commands into core calls."""
