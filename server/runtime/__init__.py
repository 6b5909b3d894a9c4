"""The serving runtime: the resident backbone and its bank of tasks, behind one runner thread.

`layers` (banked-bias wrappers), `bank` (task rows and the head table), `inputs` (tokenise on submit, pad on the
worker), `engine` (the torch backend: swap, gather, heads), `runner` (the worker thread and its typed commands),
`backend` (choosing and building an engine). Nothing here imports FastAPI.
"""
