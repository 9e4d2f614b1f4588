"""The public API behind `agentsd.patch`, `unpatch`, `status` and the presets: patching a model of
any family (`patch.py`), the pipeline making a call (`caller.py`), reports (`status.py`, counts in
`words.py`), the shipped presets (`presets.py`) and the community pipelines' files (`community.py`)."""
