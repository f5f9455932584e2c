"""Triton source templates, one module per kernel family.

Each module defines ``KERNEL`` (the whole generated module, with ``${hole}`` placeholders in
:class:`string.Template` syntax) and, where a family has variants, fragment strings that the
op fills and splices into ``KERNEL``'s holes. Templates are Python strings rather than data
files so that they ship with the package without any packaging configuration.
"""
