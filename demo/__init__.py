"""The Gradio app: calls defectclip.pipeline and nothing deeper."""
