"""defectclip: find defects in product images, see where they are, and ask what each one is."""

__version__ = "0.1.0"
