"""The core wing: config, data, batches, layouts, log-probs, losses, models, run folders.

Imports no other wing of dpo_lib (see ``dpo_lib/__init__``)."""
