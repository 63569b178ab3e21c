"""The model: what ``save_pretrained`` copies next to the weights and what runs under ``trust_remote_code``.

The bottom layer of mlpmem. Nothing here imports the rest of mlpmem (a test says so); the files
import each other relatively, which transformers follows when it copies remote code:

- ``errors``: the user-facing error;
- ``read_site``: where a memory reads the LM (decoder layer and site) and the one hook that reads it;
- ``mixing``: the mixture maths (fixed, per-token and routed mixtures of log-probs) and lambda's checks;
- ``mlp_memory``: the memory network and its folder format;
- ``gating``: the gate (lambda per token) and the router (weights per token over several memories);
- ``configuration_mlpmem``: ``MLPMemoryConfig``;
- ``integration``: the checks and constructors mlpmem registers when it is installed;
- ``modeling_mlpmem``: ``MLPMemoryForCausalLM``.

This ``__init__`` imports nothing, so ``mlpmem.modeling.errors`` loads without torch.
"""
