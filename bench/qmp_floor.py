"""The floor of a live snapshot: the least a correct client does, as a whole process of its own.

``python qmp_floor.py SOCKET NAME``: connect to QEMU's QMP socket, negotiate, ``query-block`` (which node
each disk runs on now), then one ``transaction`` of ``blockdev-snapshot-sync`` for every disk, each onto
a new overlay ``<active file>.NAME``. Standard library only, no snapfw: what any tool pays at least.
"""

import json
import socket
import sys


def main(path: str, name: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rwb")

    def execute(command, arguments=None):
        f.write(json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})}).encode() + b"\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise SystemExit(f"{command}: {reply['error']['desc']}")

    json.loads(f.readline())  # the greeting
    execute("qmp_capabilities")
    actions = [{"type": "blockdev-snapshot-sync",
                "data": {"node-name": b["inserted"]["node-name"], "format": "qcow2", "mode": "absolute-paths",
                         "snapshot-file": f"{b['inserted']['image']['filename']}.{name}",
                         "snapshot-node-name": f"floor-{name}-{i}"}}
               for i, b in enumerate(b for b in execute("query-block") if b.get("inserted"))]
    execute("transaction", {"actions": actions})
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
