"""The whole ``snapfw`` command line, declared with click: every command and option, the help, --version
and the usage errors. ``cli`` reads the plain forms of the everyday commands without it; each command's
work is in ``commands``."""

from __future__ import annotations

import click

from . import commands


class _Group(click.Group):
    """Runs the command through commands.guard: one line on stderr and an exit status for an error."""

    def invoke(self, ctx):
        p = ctx.params
        ctx.obj = commands.Options(p["uri"], p["state_dir"], p["lock_timeout"], p["debug"])
        passthrough = (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError)
        code = commands.guard(lambda: super(_Group, self).invoke(ctx), ctx.obj, passthrough)
        if code:
            ctx.exit(code)

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if isinstance(ctx.obj, commands.Options):
            ctx.obj.command = name
        return name, command, rest


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--connect", "uri", metavar="URI",
              help="Connection, e.g. images:///srv/vms (default: $SNAPFW_CONNECT, else images:// in the data dir).")
@click.option("--state-dir", metavar="DIR", help="Where the catalog lives (default depends on the connection).")
@click.option("--lock-timeout", type=float, default=30.0, show_default=True, metavar="SECONDS",
              help="How long to wait for another snapfw process working on the same domain.")
@click.option("--debug", is_flag=True, envvar="SNAPFW_DEBUG",
              help="Print the traceback of an internal error (also: SNAPFW_DEBUG=1).")
@click.version_option(package_name="snapfw")
def group(uri, state_dir, lock_timeout, debug):
    """Whole-domain snapshots of KVM and Xen guests, whatever their disks are made of."""


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the plan (commands, bytes to copy); change nothing.")


@group.command()
@click.argument("domain")
@click.argument("name")
@click.option("--description", default="", help="Free text kept with the snapshot.")
@click.option("--disk", "disks", multiple=True, metavar="TARGET=BACKEND",
              help="Backend for one disk, e.g. vda=external (repeatable).")
@click.option("--mirror/--no-mirror", default=None,
              help="Also record NAME in the hypervisor's own snapshot list (virsh snapshot-list); "
                   "default: the config file's `mirror`.")
@click.option("--lvm-size", metavar="SIZE",
              help="Copy-on-write space of each classic LVM snapshot: a share of its origin (20%) or a size "
                   "(512M) (default: $SNAPFW_LVM_SIZE, else 20%).")
@click.option("--quiesce", is_flag=False, flag_value="yes", default=None, type=click.Choice(["yes", "try"]),
              help="Freeze the running guest's filesystems (guest agent) around the snapshot; refuse if that "
                   "cannot be done, or with --quiesce=try take it crash-consistent and record why.")
@click.option("--memory", type=click.Choice(["none", "live", "paused"]), default="none", show_default=True,
              help="Also save a running DOMAIN's memory: copied while it runs (live) or while paused.")
@json_option
@dry_run_option
@click.pass_obj
def create(o, **arguments):
    """Snapshot every disk of DOMAIN as NAME."""
    return commands.create(o, **arguments)


@group.command()
@click.argument("domain")
@click.argument("name")
@click.option("--running", "state", flag_value="running",
              help="Leave DOMAIN running (default if it ran, or if NAME holds its memory: it resumes at NAME).")
@click.option("--paused", "state", flag_value="paused", help="Leave DOMAIN started but paused.")
@click.option("--stopped", "state", flag_value="shut off", help="Leave DOMAIN shut off (default if it was).")
@click.option("--keep-config", is_flag=True, help="Keep DOMAIN's configuration as it is now, not as stored with NAME.")
@json_option
@dry_run_option
@click.pass_obj
def revert(o, **arguments):
    """Revert DOMAIN to snapshot NAME (the state since the current snapshot is discarded; a running
    DOMAIN is stopped and started again)."""
    return commands.revert(o, **arguments)


@group.command()
@click.argument("domain")
@click.argument("name")
@click.option("--children", is_flag=True, help="Also delete every snapshot below NAME.")
@json_option
@dry_run_option
@click.pass_obj
def delete(o, **arguments):
    """Delete snapshot NAME of DOMAIN, merging its data into its neighbours."""
    return commands.delete(o, **arguments)


@group.command("clone")
@click.argument("domain")
@click.argument("snapshot")
@click.argument("newname")
@click.option("--count", default=1, show_default=True, help="How many clones; NEWNAME then holds {n} (web-{n}).")
@click.option("--full", is_flag=True, help="Independent sparse copies instead of overlays on a shared base.")
@click.option("--start", is_flag=True, help="Start each clone once it is defined (drivers that run domains).")
@json_option
@dry_run_option
@click.pass_obj
def clone_(o, **arguments):
    """Make new domains NEWNAME whose disks read as SNAPSHOT of DOMAIN (linked clones unless --full)."""
    return commands.clone(o, **arguments)


@group.command()
@click.argument("clone")
@json_option
@dry_run_option
@click.pass_obj
def detach(o, **arguments):
    """Make linked clone CLONE standalone: copy its shared bases into it and drop their references."""
    return commands.detach(o, **arguments)


@group.command("clone-delete")
@click.argument("clone")
@click.option("--snapshots", is_flag=True, help="Also remove CLONE's snapshots (refused otherwise while it has any).")
@json_option
@dry_run_option
@click.pass_obj
def clone_delete(o, **arguments):
    """Remove CLONE, a domain `snapfw clone` made: its definition, the files snapfw made for it, its catalog
    entries and its references on shared bases (like `virsh undefine --remove-all-storage`, limited to those)."""
    return commands.clone_delete(o, **arguments)


@group.command("list")
@click.argument("domain")
@click.option("--tree", is_flag=True, help="Show parent/child structure.")
@json_option
@click.pass_obj
def list_(o, **arguments):
    """List the snapshots of DOMAIN, oldest first."""
    return commands.list_(o, **arguments)


@group.command()
@json_option
@click.pass_obj
def domains(o, **arguments):
    """List the domains of the connection: state, snapshot count and current snapshot."""
    return commands.domains(o, **arguments)


@group.command()
@click.argument("domain")
@click.argument("name")
@json_option
@click.pass_obj
def show(o, **arguments):
    """Show one snapshot: its place in the tree and each disk's files."""
    return commands.show(o, **arguments)


@group.command()
@click.argument("domain")
@click.pass_obj
def export(o, **arguments):
    """Print DOMAIN's catalog as YAML (for people, and as a backup of the metadata)."""
    return commands.export(o, **arguments)


@group.command()
@click.argument("domain", required=False)
@click.option("--repair", is_flag=True, help="Finish or roll back interrupted operations.")
@json_option
@click.pass_obj
def check(o, **arguments):
    """Report (and with --repair, fix) interrupted operations and where the hypervisor's own snapshot
    records differ from the mirrored snapshots."""
    return commands.check(o, **arguments)


@group.command("plugins")
@json_option
@click.pass_obj
def plugins_(o, **arguments):
    """List loaded plugins with their versions, their backends and drivers, and what each can do."""
    return commands.plugins_(o, **arguments)
