"""Command-line export and push: `python -m hub --help` lists the entry points.

The export, card and push code itself is library code (`defectclip.sharing`), so the objects' own
`push_to_hub` and these commands write the same folders and cards.
"""
