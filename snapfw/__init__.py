"""snapfw: pluggable whole-domain snapshots for KVM and Xen guests.

The public API lives in :mod:`snapfw.lifecycle` (operations), :mod:`snapfw.backend` (what plugins
implement), :mod:`snapfw.steps` (steps plugins may reuse) and :mod:`snapfw.errors`. This module stays
empty of imports so that ``snapfw list`` starts fast.
"""

__version__ = "0.1.0"
