"""Tooling the library never imports."""
