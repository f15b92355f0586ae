"""fa2rt: the fastest exact attention built for the device at hand, or an explained fallback."""

from .api import (
    attention,
    attention_backward,
    attention_varlen,
    attention_varlen_backward,
    attention_with_kvcache,
    explain,
    explain_with_kvcache,
)
from .policy import Decision, FallbackWarning
from .report import capabilities

__all__ = ["attention", "attention_backward", "attention_varlen", "attention_varlen_backward", "attention_with_kvcache",
           "explain", "explain_with_kvcache", "capabilities", "Decision", "FallbackWarning"]
__version__ = "0.1.0"
