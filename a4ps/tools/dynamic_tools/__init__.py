"""Forged tools' source files, mirrored from the tool registry (git-ignored)."""
