"""The `bitfit` command line: the top layer, above `server`, `bias_store` and `bitfit`.

Each subcommand imports what it needs when it runs, so `bitfit train` never loads FastAPI and
`bitfit push` never loads torch.
"""
