"""HTTP routes of the example application."""
