"""`medtune ui`: a local web dashboard over run folders (see docs/ui.md)."""
