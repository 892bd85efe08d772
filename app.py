"""Start the defectclip inspection app (Gradio). Models: see demo/models.py."""

import sys

from demo.app import main

if __name__ == "__main__":
    sys.exit(main())
