"""Host adapters, one file per host model: native transformers 5.x LLaVA (``hf_llava``) and
LLaVA-OneVision (``hf_onevision``), and the patched forks LISA (``lisa``) and LLaVA-NeXT
(``llava_next``). Each declares what it provides and installs its hooks for a session
(``shared.prune``); none names a method. ``selection`` holds the multi-view layout and geometry
helpers the OneVision hosts share."""
from .base import HostAdapter, host_class, host_for, host_names, register_host, session_of

__all__ = ["HostAdapter", "host_class", "host_for", "host_names", "register_host", "session_of"]
