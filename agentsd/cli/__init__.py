"""The `agentsd` command: its subcommands (`commands.py`) and flags (`args.py`); generation
(`generation.py`: what a run is made of in `jobs.py`, the model set up in `model_setup.py`,
loaded in `loading.py`, its pipeline checked in `pipeline_checks.py`, the steps reported in
`step_phases.py`, the files written in `output.py` (a video's in `video.py`), the libraries kept
quiet in `quiet.py`); the quality comparison (`compare.py`: its methods and settings in
`comparison.py`, its scores in `metrics.py`); what differs between diffusers releases
(`compat.py`). `agentsd bench` runs `agentsd.bench`."""
