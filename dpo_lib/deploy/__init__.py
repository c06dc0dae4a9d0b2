"""The deployment wing: a finished run folder to GGUF files, their checks, chat and the app.
Imports only :mod:`dpo_lib.core`."""
