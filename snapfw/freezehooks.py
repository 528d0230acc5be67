"""Pre-freeze and post-thaw hooks: site scripts (the ``freeze_hooks`` section of the configuration file)
and plugins (``snapfw_pre_freeze`` / ``snapfw_post_thaw``) act just before and just after the instant a
running domain's snapshot is taken, for example to flush a database through its own client first.

    freeze_hooks:
      - phase: pre-freeze                 # or post-thaw
        run: [/usr/local/sbin/db-flush, --fast]   # argv, no shell (a string: one program, no arguments)
        domains: [db1, db2]               # optional: every domain if absent
        timeout: 30                       # seconds, default 60
        on_failure: abort                 # pre-freeze only: abort (default) or warn

Each runs with SNAPFW_DOMAIN, SNAPFW_SNAPSHOT and SNAPFW_PHASE in its environment. They are plan steps,
so they are journaled: :class:`PreFreeze` is the plan's first step (a failing or timed-out script aborts
before any change, unless ``on_failure: warn``); its undo runs the post-thaw hooks, so they run whenever
the pre-freeze hooks did, also when the snapshot fails or ``check --repair`` rolls it back;
:class:`PostThaw` runs them once the snapshot is recorded. Post-thaw failures are warnings.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import config, plugins
from .errors import BadInput, Refused, SnapfwError
from .plan import Step
from .tools.run import run

PRE_FREEZE, POST_THAW = "pre-freeze", "post-thaw"
DEFAULT_TIMEOUT = 60.0
ON_FAILURE = ("abort", "warn")


def scripts(domain: str) -> dict[str, list[dict]]:
    """phase -> the hook scripts of the configuration file for ``domain``, checked (BadInput naming the
    file and the entry), each as {"run": argv, "timeout": seconds, "on_failure": ...}."""
    path, sections = config.load()
    entries = sections.get("freeze_hooks") or []
    if not isinstance(entries, list):
        raise BadInput(f"config {path}: freeze_hooks must be a list of hooks")
    out: dict[str, list[dict]] = {PRE_FREEZE: [], POST_THAW: []}
    for i, e in enumerate(entries, 1):
        where = f"config {path}: freeze_hooks entry {i}"
        if not isinstance(e, dict) or set(e) - {"phase", "run", "domains", "timeout", "on_failure"}:
            raise BadInput(f"{where}: expected a mapping of phase, run, domains, timeout, on_failure")
        if e.get("phase") not in out:
            raise BadInput(f"{where}: phase must be {PRE_FREEZE} or {POST_THAW}")
        argv = [e["run"]] if isinstance(e.get("run"), str) else e.get("run")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
            raise BadInput(f"{where}: run must be a program or a list of its arguments (no shell)")
        domains = e.get("domains")
        if domains is not None and (not isinstance(domains, list) or not all(isinstance(d, str) for d in domains)):
            raise BadInput(f"{where}: domains must be a list of domain names")
        timeout = e.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise BadInput(f"{where}: timeout must be a positive number of seconds")
        on_failure = e.get("on_failure", "abort")
        if on_failure not in ON_FAILURE or (on_failure != "abort" and e["phase"] == POST_THAW):
            raise BadInput(f"{where}: on_failure must be abort or warn, and only for {PRE_FREEZE} "
                           "(post-thaw failures are always warnings)")
        if domains is None or domain in domains:
            out[e["phase"]].append({"run": argv, "timeout": float(timeout), "on_failure": on_failure})
    return out


def wanted(hooks: dict[str, list[dict]]) -> bool:
    """Whether a script or a plugin hooks the freeze: the plan gets the steps only then."""
    pm = plugins.get_plugin_manager()
    return bool(hooks[PRE_FREEZE] or hooks[POST_THAW] or pm.hook.snapfw_pre_freeze.get_hookimpls()
                or pm.hook.snapfw_post_thaw.get_hookimpls())


def _run(script: dict, domain: str, snapshot: str, phase: str):
    run(script["run"], timeout=script["timeout"],
        env={"SNAPFW_DOMAIN": domain, "SNAPFW_SNAPSHOT": snapshot, "SNAPFW_PHASE": phase})


def _post_thaw(ctx, domain: str, snapshot: str, scripts: list[dict]):
    """Every post-thaw hook, each failure a warning: the snapshot's fate is decided already."""
    try:
        plugins.hook().snapfw_post_thaw(domain=domain, name=snapshot)
    except Exception as e:
        ctx.reporter.warn(f"a snapfw_post_thaw hook of {domain} failed: {e}")
    for s in scripts:
        try:
            _run(s, domain, snapshot, POST_THAW)
        except SnapfwError as e:
            ctx.reporter.warn(f"post-thaw script {s['run'][0]} of {domain} failed: {e}")


@dataclass
class PreFreeze(Step):
    """Run the pre-freeze hooks of ``domain`` before snapshot ``snapshot`` (``scripts``); undo runs the
    post-thaw ones (``after``), which release what the pre-freeze ones took."""

    domain: str
    snapshot: str
    scripts: list
    after: list

    def do(self, ctx):
        plugins.hook().snapfw_pre_freeze(domain=self.domain, name=self.snapshot)
        for s in self.scripts:
            try:
                _run(s, self.domain, self.snapshot, PRE_FREEZE)
            except SnapfwError as e:
                if s["on_failure"] != "warn":
                    raise Refused(f"pre-freeze script {s['run'][0]} failed ({e}); snapshot {self.snapshot} "
                                  "was not taken") from None
                ctx.reporter.warn(f"pre-freeze script {s['run'][0]} of {self.domain} failed: {e}")

    def undo(self, ctx):
        _post_thaw(ctx, self.domain, self.snapshot, self.after)

    def describe(self):
        return f"pre-freeze hooks of {self.domain} ({len(self.scripts)} script(s))"


@dataclass
class PostThaw(Step):
    """Run the post-thaw hooks once the snapshot is recorded; failures are warnings."""

    domain: str
    snapshot: str
    scripts: list

    def do(self, ctx):
        _post_thaw(ctx, self.domain, self.snapshot, self.scripts)

    def describe(self):
        return f"post-thaw hooks of {self.domain} ({len(self.scripts)} script(s))"
