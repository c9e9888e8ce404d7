"""One package per pipeline: ``nodes.py`` holds pure functions, ``pipeline.py`` wires them."""
