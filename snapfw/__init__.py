"""snapfw: pluggable whole-domain snapshots for KVM and Xen guests.

The public API lives in :mod:`snapfw.api` (everything a plugin may import), :mod:`snapfw.lifecycle`
(operations), :mod:`snapfw.testing` (the conformance kit) and :mod:`snapfw.errors`. This module stays
empty of imports so that ``snapfw list`` starts fast.
"""

__version__ = "0.1.0"
