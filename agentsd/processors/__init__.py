"""The attention processors, one per kind of attention: a UNet's or PixArt's self-attention
(`self_attention.py`, also the base of the others), SD 3's joint attention (`joint_attention.py`)
and Flux's attention (`flux_attention.py`), with the IP-Adapter variants of the last two keeping an
adapter's weights in the model (`shared_weights.py`). Built on `agentsd.core` only."""
