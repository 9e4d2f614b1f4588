"""The algorithm, blind to model families: the configuration, token merging, the fused agent
attention, each model call's plan and progress along the trajectory. Imports nothing else of agentsd."""
