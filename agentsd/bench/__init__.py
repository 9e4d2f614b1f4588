"""The benchmark behind `agentsd bench`: the runs (`benchmark.py`), the UNets and diffusion
transformers it builds (`unet_models.py`, `transformer_models.py`, the Wan video transformers in
`wan_models.py`), the methods it times (`methods.py`), its rows and files (`results.py`) and the
speed targets read off them (`targets.py`); under context parallelism (`--context-parallel`) the
runs over several processes (`parallel.py`), the elements each rank sends, counted
(`collectives.py`) and from the sizes (`traffic.py`)."""
