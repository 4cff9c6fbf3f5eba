"""Typer CLI: maps flags to configs and calls the stages. No torch import at module level."""
