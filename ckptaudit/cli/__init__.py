"""The command-line interface: thin commands over the library (see app.py)."""
