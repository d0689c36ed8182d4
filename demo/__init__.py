"""dgkit.demo: the Gradio app that shows the CLIP teacher and the shipped student side by side.

`dgkit.demo.app.build_app(run, artifact)` builds it, `dgkit.demo.app.launch` serves it,
`dgkit.demo.models` holds the gradio-free part, `dgkit.demo.screenshot` drives it in Chromium.
Nothing is imported here, so `dgkit --help` stays fast without gradio.
"""
