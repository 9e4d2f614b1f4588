"""The benchmark behind `agentsd bench`: the runs (`benchmark.py`), the diffusion transformers it
builds (`transformer_models.py`), the methods it times (`methods.py`), its rows, targets and files
(`results.py`)."""
