"""The only modules that run external programs. Everything else calls these functions."""
