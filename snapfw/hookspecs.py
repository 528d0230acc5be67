"""Every hook snapfw calls, grouped by when it is called. PLUGINS.md has a section for each.

Registration hooks hand the core classes; lifecycle hooks let plugins and site scripts act around an
operation. A hook implementation may leave out arguments it does not use (pluggy passes by name), so new
arguments can be added to a hook without breaking existing plugins.
"""

import pluggy

hookspec = pluggy.HookspecMarker("snapfw")
hookimpl = pluggy.HookimplMarker("snapfw")


# --- registration: called once when the plugin manager is built -----------------------------------
@hookspec
def snapfw_disk_backends():
    """Return a list of :class:`snapfw.api.DiskBackend` subclasses this plugin provides.

    Called once per process when backends are first needed. All results are collected; two backends
    with the same ``name``, or anything but a DiskBackend subclass, are a PluginError naming the plugin(s).
    """


@hookspec
def snapfw_hypervisor_drivers():
    """Return a list of :class:`snapfw.api.HypervisorDriver` subclasses this plugin provides.

    Called once per process when a connection is opened; drivers are chosen by URI ``scheme``. All results
    are collected; two drivers with the same scheme, or anything but a HypervisorDriver subclass, are a
    PluginError.
    """


@hookspec
def snapfw_memory_backends():
    """Return a list of :class:`snapfw.api.MemoryBackend` subclasses this plugin provides.

    Called once per process when a snapshot with memory state is planned or reverted. Each says which
    hypervisor drivers (URI schemes) it serves; all results are collected, and two backends with the same
    ``name``, or anything but a MemoryBackend subclass, are a PluginError.
    """


# --- lifecycle: called around every changing operation --------------------------------------------
@hookspec
def snapfw_plan_built(operation, domain, plan):
    """Called after the plan for ``operation`` ("create", "revert" or "delete") on ``domain`` is built
    and before it runs or is printed by --dry-run. An implementation may append steps to
    ``plan.prepare`` / ``plan.finish`` or raise a SnapfwError to veto the operation. All implementations run.
    """


@hookspec
def snapfw_pre_snapshot(domain, name):
    """Called just before the plan creating snapshot ``name`` of ``domain`` executes (not on --dry-run).
    Raising a SnapfwError aborts the operation before any change. All implementations run.
    """


@hookspec
def snapfw_post_snapshot(domain, snapshot):
    """Called after snapshot ``snapshot`` (a :class:`snapfw.model.Snapshot`) of ``domain`` is recorded.
    Anything it raises is a warning naming the plugin; the snapshot stays. All implementations run.
    """


@hookspec
def snapfw_pre_revert(domain, name):
    """Called just before ``domain`` is reverted to snapshot ``name``; raising aborts. All run."""


@hookspec
def snapfw_post_revert(domain, name):
    """Called after ``domain`` was reverted to snapshot ``name``; errors become warnings. All run."""


@hookspec
def snapfw_pre_delete(domain, names):
    """Called just before snapshots ``names`` (a list) of ``domain`` are deleted; raising aborts. All run."""


@hookspec
def snapfw_post_delete(domain, names):
    """Called after snapshots ``names`` of ``domain`` were deleted; errors become warnings. All run."""


@hookspec
def snapfw_pre_freeze(domain, name):
    """Called just before the instant snapshot ``name`` of running domain ``domain`` (its name, a str:
    the call is a journaled plan step) is taken: before its filesystems are frozen with ``--quiesce``,
    before the hypervisor's transaction without. Raising a SnapfwError aborts before any change. All run.
    """


@hookspec
def snapfw_post_thaw(domain, name):
    """Called once the snapshot is taken and the guest thawed, and also when it failed or was rolled
    back after ``snapfw_pre_freeze`` ran (to release what that took). Errors become warnings. All run.
    """
