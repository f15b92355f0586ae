"""Switches that route other libraries' attention through fa2rt's public calls; none is active until registered.

- fa2rt.integrations.transformers.register(): attn_implementation="fa2rt" in transformers.
- fa2rt.integrations.sdpa.register(): torch.nn.attention.activate_flash_attention_impl("fa2rt") for SDPA.
"""
