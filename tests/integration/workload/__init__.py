"""Guest workload for the live-migration tests: see ``build.py`` (its docstring
is the README: boot path, memory layout, what each zone does to XBZRLE)."""
